"""Memory of the central server under a burst of uploads it must refuse.

    uv run python bench/unsigned_upload_bench.py [--smoke] [--uploads N] [--megabytes M]

The real server runs in its own process on loopback (SQLite, one appliance
enrolled). Two bursts of ``--uploads`` parallel audit-sync uploads of
``--megabytes`` MB each (under the route's 8 MiB limit, so only the
signature can refuse them):

- ``unsigned``: no signature headers at all;
- ``forged``: signed by a stranger's key under the enrolled appliance's key
  id (the signature does not verify).

Each client sends its headers, then its body in 64 KiB writes, and stops
sending once an answer arrives. The server's resident memory is read from
/proc/PID/status: idle after enrollment, and the peak during each burst
(VmHWM, reset before each burst through /proc/PID/clear_refs, and VmRSS
sampled every 5 ms as a cross-check). The ratio of each peak to the idle
figure is the baseline measured in the same run: a server that reads a
refused body whole grows by about uploads x size; one that refuses from the
headers stays near 1.

Figures (``figure=value unit``): idle RSS, peak RSS of each burst, the
peak/idle ratios, and the answers' statuses.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
import threading
import time
from pathlib import Path

from central_ingest_bench import enroll, free_port, prepare_central, start, stop, wait_until_up
from msp_protocol.httpsig import HttpRequest, content_digest, sign_message
from msp_protocol.keys import SigningKey

CHUNK = 64 * 1024


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in KiB."""
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            figures[name] = int(value.split()[0])
    return figures


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: clear_refs 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Sampler:
    """VmRSS of ``pid`` every 5 ms on a thread; the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, memory_kib(self.pid)["VmRSS"])
            time.sleep(0.005)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def upload(port: int, path: str, headers: dict[str, str], size: int) -> int:
    """Send the headers, then the body until an answer comes; its status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {size}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    answer = asyncio.ensure_future(reader.readline())
    chunk = b"x" * CHUNK
    try:
        sent = 0
        while sent < size and not answer.done():
            piece = chunk[: min(CHUNK, size - sent)]
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
        status_line = await asyncio.wait_for(answer, 120)
        return int(status_line.split()[1]) if status_line else 0
    except (ConnectionError, IndexError, ValueError):
        return 0  # closed on us without an answer
    finally:
        answer.cancel()
        writer.close()


def forged_headers(url: str, key_id: str) -> dict[str, str]:
    """Headers signed by a stranger's key, naming the appliance's key id."""
    headers = {
        "Content-Digest": content_digest(b"not the body"),
        "Content-Type": "application/json",
    }
    signed = sign_message(
        SigningKey.generate(),
        HttpRequest.build("POST", url, headers),
        components=["@method", "@target-uri", "content-digest"],
        params={"created": int(time.time()), "nonce": "f0" * 16, "keyid": key_id},
    )
    return headers | signed


async def burst(
    pid: int, port: int, path: str, headers: dict[str, str], uploads: int, size: int
) -> tuple[int, int, collections.Counter[int], float]:
    """Fire ``uploads`` at once; (VmHWM, sampled peak RSS) in KiB, statuses, seconds."""
    exact = reset_peak(pid)
    started = time.perf_counter()
    with Sampler(pid) as sampler:
        statuses = await asyncio.gather(
            *(upload(port, path, headers, size) for _ in range(uploads))
        )
        await asyncio.sleep(0.05)
    seconds = time.perf_counter() - started
    figures = memory_kib(pid)
    hwm = figures["VmHWM"] if exact else max(sampler.peak, figures["VmRSS"])
    return hwm, sampler.peak, collections.Counter(statuses), seconds


async def run(uploads: int, size: int) -> None:
    with tempfile.TemporaryDirectory(prefix="msp-upload-bench-") as tmp:
        directory = Path(tmp)
        url = f"sqlite+aiosqlite:///{directory / 'central.db'}"
        tokens, root = await prepare_central(directory, url, 1)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        central = start(
            [
                *("-m", "msp_central.cli", "--state-dir", str(directory)),
                *("--database-url", url, "serve", "--port", str(port)),
            ],
            {"MSP_CENTRAL_ROOT_KEY_FILE": str(directory / "root.key")},
        )
        try:
            await wait_until_up(base + "/api/v1/openapi.json")
            appliance = await enroll(base, tokens[0], root.key_id)
            path = f"/api/v1/appliances/{appliance.appliance_id}/audit/sync"
            await asyncio.sleep(0.5)
            idle = memory_kib(central.pid)["VmRSS"]
            results = {
                "unsigned": await burst(
                    central.pid,
                    port,
                    path,
                    {"Content-Type": "application/json"},
                    uploads,
                    size,
                ),
                "forged": await burst(
                    central.pid,
                    port,
                    path,
                    forged_headers(base + path, appliance.key.key_id),
                    uploads,
                    size,
                ),
            }
        finally:
            stop(central)

    print(f"uploads={uploads} parallel")
    print(f"upload_size={size / 1e6:.1f} MB")
    print(f"idle_rss={idle / 1024:.1f} MiB")
    for name, (hwm, sampled, statuses, seconds) in results.items():
        print(f"{name}_peak_rss={hwm / 1024:.1f} MiB")
        print(f"{name}_peak_rss_sampled={sampled / 1024:.1f} MiB")
        print(f"{name}_peak_vs_idle={hwm / idle:.2f} ratio")
        print(f"{name}_growth={(hwm - idle) / 1024:.1f} MiB")
        print(f"{name}_seconds={seconds:.2f} s")
        answers = ",".join(f"{status}x{count}" for status, count in sorted(statuses.items()))
        print(f"{name}_answers={answers} status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a small smoke run")
    parser.add_argument("--uploads", type=int, default=60, help="parallel uploads per burst")
    parser.add_argument("--megabytes", type=float, default=8.0, help="size of each upload (MB)")
    args = parser.parse_args()
    uploads, megabytes = (4, 1.0) if args.smoke else (args.uploads, args.megabytes)
    asyncio.run(run(uploads, int(megabytes * 1_000_000)))


if __name__ == "__main__":
    main()
