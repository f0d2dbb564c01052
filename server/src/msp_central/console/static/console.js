// The console's shared module: calling the API with the session, building
// DOM safely (text is never parsed as HTML), and the few widgets every page
// uses. Pages import from here; nothing here runs on its own.

const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content ?? "";

/** Who is signed in: role (viewer, editor, admin), e-mail, partner name. */
export const me = {
  role: meta("console-role"),
  email: meta("console-email"),
  partner: meta("console-partner"),
};

const RANK = { viewer: 0, editor: 1, admin: 2 };
/** Whether the signed-in user's role allows `need` ("edit" or "admin"). */
export function can(need) {
  return (RANK[me.role] ?? -1) >= (need === "admin" ? 2 : need === "edit" ? 1 : 0);
}

/** An error the API answered with (an RFC 9457 problem). */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
    this.code = this.problem.code || "";
  }
}

/**
 * Call the JSON API as the signed-in user. `body` is sent as JSON (or as a
 * merge patch with `patch: true`); state-changing calls carry the session's
 * CSRF token. Resolves to the parsed answer (null for 204), rejects with an
 * ApiError. A session that has ended sends the browser to sign in again.
 */
export async function api(path, { method = "GET", body, patch = false, signal } = {}) {
  const headers = { Accept: "application/json, application/problem+json" };
  if (method !== "GET" && method !== "HEAD") headers["X-CSRF-Token"] = meta("csrf-token");
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = patch ? "application/merge-patch+json" : "application/json";
    payload = JSON.stringify(body);
  }
  const response = await fetch(path, {
    method,
    headers,
    body: payload,
    credentials: "same-origin",
    signal,
  });
  if (response.status === 204) return null;
  const type = response.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await response.json() : await response.blob();
  if (!response.ok) {
    if (response.status === 401 && data?.code === "session-expired") {
      const next = encodeURIComponent(location.pathname + location.search);
      location.assign(`/console/sign-in?next=${next}`);
    }
    throw new ApiError(response.status, data);
  }
  return data;
}

/** Every item of a paginated list (following next_cursor), up to `max`. */
export async function apiAll(path, { max = 10000 } = {}) {
  const items = [];
  let cursor = null;
  do {
    const separator = path.includes("?") ? "&" : "?";
    const url = cursor ? `${path}${separator}cursor=${encodeURIComponent(cursor)}` : path;
    const page = await api(url);
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < max);
  return items;
}

/**
 * Build an element: h("a", {href: "/x", class: "link", onclick: fn}, "text", child).
 * Strings become text nodes; null/false children are skipped; arrays are flattened.
 */
export function h(tag, attrs = {}, ...children) {
  const svg = ["svg", "g", "rect", "line", "text", "title", "path", "polyline", "circle", "desc"].includes(tag);
  const element = svg
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      element.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      element.setAttribute("class", value);
    } else if (key === "dataset") {
      Object.assign(element.dataset, value);
    } else if (!svg && key in element && typeof value !== "string") {
      element[key] = value;
    } else {
      element.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's content. */
export function replace(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

/** The page's own container (filled by the page module). */
export function pageRoot() {
  return document.getElementById("page");
}

/** Mark the page loaded (screen readers hear the new content once). */
export function ready() {
  pageRoot()?.setAttribute("aria-busy", "false");
}

/** An error box for an API refusal (or any failure), with its code. */
export function errorBox(error) {
  const detail = error instanceof ApiError
    ? [error.problem.title || "The server refused", ": ", error.message]
    : ["Something went wrong: ", String(error?.message || error)];
  return h("div", { class: "error", role: "alert" }, ...detail,
    error?.code ? h("span", { class: "code" }, ` (${error.code})`) : null);
}

/** Show an error at the top of `where` (replacing an earlier one). */
export function showError(where, error) {
  where.querySelector(":scope > .error")?.remove();
  const box = errorBox(error);
  where.prepend(box);
  box.setAttribute("tabindex", "-1");
  box.focus();
  return box;
}

/** A transient notice ("Saved.") announced politely. */
export function notice(where, text) {
  where.querySelector(":scope > .notice")?.remove();
  const box = h("p", { class: "notice", role: "status" }, text);
  where.prepend(box);
  return box;
}

/** A time as the user's locale writes it, in a <time> element. */
export function time(iso) {
  if (!iso) return h("span", { class: "muted" }, "never");
  const date = new Date(iso);
  return h("time", { datetime: iso, title: iso }, date.toLocaleString(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
  }));
}

/** "3 min ago", "2 days ago". */
export function ago(iso) {
  if (!iso) return "never";
  const seconds = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  const units = [["day", 86400], ["hour", 3600], ["minute", 60]];
  for (const [unit, size] of units) {
    if (Math.abs(seconds) >= size) {
      const n = Math.round(seconds / size);
      return new Intl.RelativeTimeFormat(undefined, { numeric: "auto" }).format(-n, unit);
    }
  }
  return "just now";
}

const STATUS = {
  pass: ["✓", "Passing"], passing: ["✓", "Passing"], compliant: ["✓", "Compliant"],
  fail: ["✗", "Failing"], failing: ["✗", "Failing"], "non-compliant": ["✗", "Non-compliant"],
  error: ["!", "Error"], unknown: ["?", "No evidence"], "no-evidence": ["?", "No evidence"],
  stale: ["⧗", "Stale"], online: ["●", "Online"], offline: ["○", "Offline"],
  "never-seen": ["–", "Never seen"], decommissioned: ["–", "Decommissioned"],
  open: ["!", "Open"], acknowledged: ["✓", "Acknowledged"], manual: ["✎", "Manual"],
};

/** A status shown by symbol and word, never by colour alone. */
export function badge(status, label) {
  const [symbol, word] = STATUS[status] || ["•", status];
  return h("span", { class: `badge badge-${String(status).replace(/[^a-z-]/g, "")}` },
    h("span", { "aria-hidden": "true" }, symbol), " ", label || word);
}

/**
 * A table: columns are [{label, cell: row => node|string, class?}]. Rows may
 * be appended later with table.addRows(rows).
 */
export function table({ caption, columns, rows = [], empty = "Nothing to show." }) {
  const body = h("tbody");
  const element = h("table", { class: "data" },
    caption ? h("caption", {}, caption) : null,
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.class }, c.label)))),
    body);
  const emptyRow = h("tr", { class: "empty" }, h("td", { colspan: columns.length }, empty));
  element.addRows = (more) => {
    emptyRow.remove();
    for (const row of more) {
      body.append(h("tr", {}, columns.map((c, i) => {
        const value = c.cell(row);
        return i === 0 && c.header !== false ? h("th", { scope: "row", class: c.class }, value) : h("td", { class: c.class }, value);
      })));
    }
    if (!body.children.length) body.append(emptyRow);
  };
  element.clearRows = () => body.replaceChildren();
  element.addRows(rows);
  return h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": caption || "Table" }, element);
}

/**
 * A list read a page at a time: calls load(cursor) -> {items, next_cursor},
 * shows the rows in `tableWrap` (from table()) and a "Show more" button
 * while there are more.
 */
export function paged(tableWrap, load) {
  const element = tableWrap.querySelector("table");
  const more = h("button", { type: "button", class: "more" }, "Show more");
  const container = h("div", { class: "paged" }, tableWrap, more);
  let cursor = null;
  let first = true;
  async function next() {
    more.disabled = true;
    try {
      const page = await load(cursor);
      if (first) element.clearRows();
      first = false;
      element.addRows(page.items);
      cursor = page.next_cursor;
      more.hidden = !cursor;
    } catch (error) {
      showError(container, error);
    } finally {
      more.disabled = false;
    }
  }
  more.addEventListener("click", next);
  container.reload = () => { cursor = null; first = true; return next(); };
  container.ready = next();
  return container;
}

/** A query string from an object, skipping empty values. */
export function query(values) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(values)) {
    if (value !== null && value !== undefined && value !== "") params.set(key, value);
  }
  const text = params.toString();
  return text ? `?${text}` : "";
}

/** The page's own query parameters (deep links), and a way to set them. */
export function params() {
  return new URLSearchParams(location.search);
}
export function setParams(values) {
  history.replaceState(null, "", location.pathname + query({ ...Object.fromEntries(params()), ...values }));
}

/**
 * A horizontal bar chart in SVG: data [{label, value}], each bar labelled
 * with its value in text (the numbers are also in the page's table).
 */
export function barChart({ title, data, unit = "" }) {
  const rowHeight = 28;
  const labelWidth = 150;
  const width = 520;
  const max = Math.max(1, ...data.map((d) => d.value));
  const height = rowHeight * data.length + 8;
  const id = `chart-${Math.random().toString(36).slice(2, 8)}`;
  const svg = h("svg", {
    class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": id,
    preserveAspectRatio: "xMinYMin meet",
  }, h("title", { id }, title));
  data.forEach((d, i) => {
    const y = i * rowHeight + 4;
    const barWidth = Math.round(((width - labelWidth - 60) * d.value) / max);
    svg.append(
      h("text", { x: labelWidth - 8, y: y + 17, "text-anchor": "end", class: "chart-label" }, d.label),
      h("rect", { x: labelWidth, y: y + 4, width: Math.max(barWidth, 1), height: rowHeight - 10, class: "chart-bar", rx: 2 }),
      h("text", { x: labelWidth + barWidth + 6, y: y + 17, class: "chart-value" }, `${d.value}${unit}`),
    );
  });
  return svg;
}

/**
 * A modal dialog (native <dialog>): returns {dialog, close}. Escape and the
 * close button close it; focus returns to what opened it.
 */
export function dialog({ title, content, onclose }) {
  const opener = document.activeElement;
  const titleId = `dialog-${Math.random().toString(36).slice(2, 8)}`;
  const close = () => element.close();
  const element = h("dialog", { class: "dialog", "aria-labelledby": titleId },
    h("div", { class: "dialog-head" },
      h("h2", { id: titleId }, title),
      h("button", { type: "button", class: "link close", "aria-label": "Close", onclick: close }, "✕")),
    h("div", { class: "dialog-body" }, content));
  element.addEventListener("close", () => {
    element.remove();
    opener?.focus?.();
    onclose?.();
  });
  document.body.append(element);
  element.showModal();
  return { dialog: element, close };
}

/** Copy text to the clipboard, saying so next to `button`. */
export async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Select and copy the text";
  }
}

/** Run the page: `render(root)` fills it; a failure is shown, not swallowed. */
export async function run(render) {
  const root = pageRoot();
  try {
    await render(root);
  } catch (error) {
    replace(root, errorBox(error));
  } finally {
    ready();
  }
}
