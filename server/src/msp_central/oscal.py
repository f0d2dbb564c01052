"""A site's compliance posture as an OSCAL Assessment Results document, for
GRC tools that import NIST OSCAL JSON. Pure: it takes what
:func:`msp_central.posture.evaluate` computed and returns a dict; the route
serves it, so the document and the posture endpoint never disagree.

The shape, one ``result`` per document:

- ``reviewed-controls``: one control selection per framework, listing every
  control of it the site uses;
- ``findings``: one per control, whose ``target`` is the control's
  objective status: ``satisfied`` only when the control is ``passing``,
  ``not-satisfied`` otherwise (fail closed: an error, stale evidence, a
  control no check covers and one a check found not applicable are not
  evidence that it is met), with the reason ``pass``, ``fail`` or ``other``
  and remarks saying why; ``not_applicable`` also sets the implementation
  status OSCAL has for it;
- ``observations``: one per signed bundle behind a control's state, method
  ``TEST``, collected when the appliance collected it, whose
  ``relevant-evidence`` links the signed evidence export of that bundle.

Control ids: OSCAL's ``target-id`` and ``control-id`` are tokens (a letter
or ``_`` first; letters, digits, ``.``, ``-``, ``_``), which most catalogue
ids are not (``164.312(a)(1)``, ``1.2.1``), and the same id names different
controls in different frameworks (PCI DSS 3.1.1, NIST SP 800-171 3.1.1).
:func:`control_token` writes them as NIST writes SP 800-53 enhancements in
OSCAL (lower case, ``(x)`` as ``.x``), prefixed with the framework; the
exact catalogue id rides along in a ``control-id`` property.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final
from urllib.parse import quote

from msp_central.posture import ControlPosture, ControlState, FrameworkPosture
from msp_central.posture import Observation as Bundle
from msp_protocol.encoding import format_time

# The OSCAL model version the documents conform to: the one
# compliance-trestle's models implement, which the tests validate against.
OSCAL_VERSION: Final = "1.2.1"
# Properties OSCAL does not define carry this namespace, as OSCAL requires.
NAMESPACE: Final = "urn:msp:posture"
# The uuid5 namespace of every UUID in a document: the same site, evaluation
# time and control always give the same UUIDs, so a re-import updates.
_UUIDS: Final = uuid.uuid5(uuid.NAMESPACE_URL, NAMESPACE)

_STATUS: Final[dict[ControlState, tuple[str, str]]] = {
    "passing": ("satisfied", "pass"),
    "failing": ("not-satisfied", "fail"),
    "error": ("not-satisfied", "other"),
    "stale": ("not-satisfied", "other"),
    "manual": ("not-satisfied", "other"),
    "not_applicable": ("not-satisfied", "other"),
}
_NOT_TOKEN: Final = re.compile(r"[^a-z0-9._-]+")


def control_token(framework_id: str, control_id: str) -> str:
    """The OSCAL token for a catalogue control: ``hipaa-164.312.a.2.i`` for
    HIPAA's ``164.312(a)(2)(i)``, ``nist_csf-gv.oc-01`` for ``GV.OC-01``."""
    text = control_id.lower().replace(")(", ".").replace("(", ".").replace(")", "")
    return f"{framework_id}-{_NOT_TOKEN.sub('-', text).strip('-.')}"


def evidence_href(base_url: str, site_id: str, bundle: Bundle) -> str:
    """The URL of the signed evidence export of ``bundle``."""
    parts = (site_id, bundle.appliance_id, bundle.bundle_id)
    site, appliance, bundle_id = (quote(part, safe="") for part in parts)
    return f"{base_url}/api/v1/sites/{site}/evidence/{appliance}/{bundle_id}"


def assessment_results(
    *,
    site_id: str,
    site_name: str,
    evaluated_at: datetime,
    posture: Sequence[FrameworkPosture],
    base_url: str,
) -> dict[str, Any]:
    """The OSCAL Assessment Results document (``{"assessment-results": …}``)
    of one site's posture at ``evaluated_at``; evidence links start with
    ``base_url`` (no trailing slash).

    Raises ``ValueError`` when the posture has no control: OSCAL needs at
    least one reviewed control."""
    if not any(framework.controls for framework in posture):
        raise ValueError("the posture has no control to report")
    at = format_time(evaluated_at)

    def new_uuid(*names: str) -> str:
        return str(uuid.uuid5(_UUIDS, "\x1f".join((site_id, at, *names))))

    observations: dict[tuple[str, str], dict[str, Any]] = {}
    findings = []
    for framework in posture:
        for control in framework.controls:
            related = []
            if control.evidence is not None:
                key = (control.evidence.appliance_id, control.evidence.bundle_id)
                if key not in observations:
                    observations[key] = _observation(
                        new_uuid("observation", *key),
                        control.evidence,
                        evidence_href(base_url, site_id, control.evidence),
                    )
                related.append({"observation-uuid": observations[key]["uuid"]})
            finding = _finding(
                new_uuid("finding", control.framework_id, control.control_id),
                framework.name,
                control,
            )
            if related:
                finding["related-observations"] = related
            findings.append(finding)

    result: dict[str, Any] = {
        "uuid": new_uuid("result"),
        "title": f"Compliance posture of {site_name} at {at}",
        "description": (
            "Each control's state from the newest signed evidence bundle of each "
            "appliance and check that lists it, the worst state winning; evidence "
            "older than three of its appliance's check intervals is stale."
        ),
        "start": at,
        "props": [_prop("site-id", site_id)],
        "reviewed-controls": {
            "control-selections": [
                {
                    "description": framework.name,
                    "props": [_prop("framework", framework.framework_id)],
                    "include-controls": [
                        {"control-id": control_token(c.framework_id, c.control_id)}
                        for c in framework.controls
                    ],
                }
                for framework in posture
                if framework.controls
            ]
        },
        "findings": findings,
    }
    if observations:
        result["observations"] = list(observations.values())
    return {
        "assessment-results": {
            "uuid": new_uuid("assessment-results"),
            "metadata": {
                "title": f"Compliance posture of {site_name}",
                "last-modified": at,
                "version": at,
                "oscal-version": OSCAL_VERSION,
                "remarks": (
                    "Derived at the time of asking from the signed evidence the "
                    "central server stores; each observation links the signed "
                    "evidence export behind it, which msp-verify checks offline."
                ),
            },
            "import-ap": {
                "href": f"urn:msp:assessment-plan:{quote(site_id, safe='')}",
                "remarks": (
                    "No assessment plan document is published: the plan is the site's "
                    "framework selection and the checks of its coverage tier, run "
                    "continuously by its appliances. This reference only names it."
                ),
            },
            "results": [result],
        }
    }


def _prop(name: str, value: str) -> dict[str, str]:
    return {"name": name, "ns": NAMESPACE, "value": value}


def _finding(finding_uuid: str, framework_name: str, control: ControlPosture) -> dict[str, Any]:
    state, reason = _STATUS[control.state]
    target: dict[str, Any] = {
        "type": "objective-id",
        "target-id": control_token(control.framework_id, control.control_id),
        "title": control.title,
        "status": {"state": state, "reason": reason, "remarks": _why(control)},
    }
    if control.state == "not_applicable":
        target["implementation-status"] = {"state": "not-applicable"}
    return {
        "uuid": finding_uuid,
        "title": f"{framework_name} {control.control_id}: {control.title}",
        "description": (
            f"{control.state.replace('_', ' ').capitalize()}: "
            f"{framework_name} {control.control_id} ({control.title})."
        ),
        "props": [
            _prop("framework", control.framework_id),
            _prop("control-id", control.control_id),
            _prop("posture-state", control.state),
        ],
        "target": target,
    }


def _why(control: ControlPosture) -> str:
    """Why the control has its state, in a sentence or two."""
    bundle = control.evidence
    document = control.attachment
    if bundle is None and document is not None and control.state == "passing":
        until = f" until {format_time(document.expires_at)}" if document.expires_at else ""
        return (
            f"Manual evidence {document.filename} (SHA-256 {document.sha256}), attached by "
            f"{document.attached_by} at {format_time(document.attached_at)}, counts{until}; "
            f"its hash is entry {document.log_index} of the central log."
        )
    if bundle is None:
        if control.state == "manual":
            return "No automated check covers this control: it needs manual evidence."
        return "No evidence yet from the automated checks that cover this control."
    said = bundle.reason
    because = f": {said}" if said else "."
    seen = f"check {bundle.check_id} on appliance {bundle.appliance_id}"
    match control.state:
        case "passing":
            return f"The {seen} passed."
        case "failing":
            return f"The {seen} failed{because}"
        case "error":
            return f"The {seen} could not decide (error){because}"
        case "not_applicable":
            return f"The {seen} found the control does not apply{because}"
        case _:  # stale: the newest evidence is too old to speak for now
            return (
                f"The newest evidence, from the {seen} ({bundle.result}, collected "
                f"{format_time(bundle.collected_at)}), is older than its appliance's "
                "freshness window: no recent evidence."
            )


def _observation(observation_uuid: str, bundle: Bundle, href: str) -> dict[str, Any]:
    said = bundle.reason
    description = f"Check {bundle.check_id} on appliance {bundle.appliance_id}: {bundle.result}"
    description += f" ({said})." if said else "."
    notes = []
    if bundle.in_log is not True:
        notes.append("The bundle is not yet witnessed in its appliance's audit log.")
    if bundle.signed_after_expiry:
        notes.append("The bundle was signed after its appliance's certificate expired.")
    observation: dict[str, Any] = {
        "uuid": observation_uuid,
        "title": f"{bundle.check_id} on {bundle.appliance_id}",
        "description": description,
        "props": [
            _prop("check-id", bundle.check_id),
            _prop("appliance-id", bundle.appliance_id),
            _prop("bundle-id", bundle.bundle_id),
            _prop("result", bundle.result),
            _prop("log-index", str(bundle.log_index)),
        ],
        "methods": ["TEST"],
        "relevant-evidence": [
            {
                "href": href,
                "description": (
                    f"Signed evidence bundle {bundle.bundle_id} as an evidence export, "
                    "with its audit entry, inclusion proof and receipt."
                ),
            }
        ],
        "collected": format_time(bundle.collected_at),
    }
    if notes:
        observation["remarks"] = " ".join(notes)
    return observation
