// "Open evidence": the signed bundle behind a control's state, read from its
// evidence export (the very file msp-verify checks offline), shown in a
// dialog with a link to download that file.

import { api, badge, dialog, h, replace, showError, table, time } from "../console.js";

const RESULT = { pass: "Pass", fail: "Fail", error: "Error" };

/** The API path of one bundle's evidence export. */
export function bundlePath(siteId, evidence) {
  const part = encodeURIComponent;
  return `/api/v1/sites/${part(siteId)}/evidence/${part(evidence.appliance_id)}/${part(evidence.bundle_id)}`;
}

/** The signed payload of a DSSE envelope, parsed (base64, standard or URL-safe). */
export function payloadOf(envelope) {
  const text = atob(envelope.payload.replace(/-/g, "+").replace(/_/g, "/"));
  const bytes = Uint8Array.from(text, (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

/** An observed value as text: strings as they are, anything else as JSON. */
function shown(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

/** What the audit log says about the bundle, in words. */
function witness(exported, evidence) {
  if (exported.log) {
    return [badge("pass", "Witnessed"), ` Entry ${evidence.log_index} of the appliance's audit log records this bundle; `
      + "the export carries its inclusion proof and the server's receipt."];
  }
  if (evidence.in_log === false) {
    return [badge("fail", "Contradicted"), ` Entry ${evidence.log_index} of the appliance's audit log records another bundle.`];
  }
  if (evidence.in_log === true) {
    return [badge("pass", "Witnessed"), ` Entry ${evidence.log_index} of the audit log records it; no cosigned checkpoint covers it yet.`];
  }
  return [badge("stale", "Not yet"), ` The appliance has not yet synced its audit log up to entry ${evidence.log_index}.`];
}

function details(exported, evidence, control, siteId) {
  const bundle = payloadOf(exported.evidence);
  const observed = bundle.observed && typeof bundle.observed === "object" ? bundle.observed : {};
  const mapped = Object.entries(bundle.controls || {}).map(([framework, ids]) => `${framework}: ${ids.join(", ")}`);
  const path = bundlePath(siteId, evidence);
  return [
    h("dl", { class: "facts" },
      h("dt", {}, "Control"), h("dd", {}, h("code", {}, control.control_id), " ", control.title),
      h("dt", {}, "Check"), h("dd", {}, h("code", {}, bundle.check_id)),
      h("dt", {}, "Result"), h("dd", {}, badge(bundle.result, RESULT[bundle.result] || bundle.result)),
      observed.reason ? [h("dt", {}, "Reason"), h("dd", { class: "reason" }, String(observed.reason))] : null,
      h("dt", {}, "Collected"), h("dd", {}, time(bundle.collected_at)),
      h("dt", {}, "Appliance"), h("dd", {}, h("code", {}, bundle.appliance_id)),
      h("dt", {}, "Bundle"), h("dd", {}, h("code", {}, bundle.bundle_id)),
      h("dt", {}, "Signed by key"), h("dd", {}, h("code", {}, exported.evidence.signatures.map((s) => s.keyid).join(", "))),
      h("dt", {}, "Audit log"), h("dd", {}, witness(exported, evidence)),
      mapped.length ? [h("dt", {}, "Evidence for"), h("dd", {}, mapped.join("; "))] : null,
    ),
    evidence.signed_after_expiry
      ? h("p", { class: "warning" }, "Signed after the appliance's certificate had expired.")
      : null,
    h("h3", {}, "Observed values"),
    table({
      caption: "What the check observed",
      columns: [
        { label: "Name", cell: ([name]) => h("code", {}, name) },
        { label: "Value", cell: ([, value]) => h("code", {}, shown(value)) },
      ],
      rows: Object.entries(observed),
      empty: "The check recorded no values.",
    }),
    h("p", { class: "row evidence-actions" },
      h("a", { class: "button primary", href: path, download: `evidence-${bundle.bundle_id}.json` }, "Download the signed bundle"),
      h("span", { class: "hint" }, "Check it offline with msp-verify and the central key."),
    ),
  ];
}

/** Open the dialog for a control's evidence; the bundle is read on demand. */
export async function openEvidence(siteId, control) {
  const evidence = control.evidence;
  const body = h("div", { class: "stack evidence" }, h("p", { class: "loading" }, "Reading the signed bundle…"));
  dialog({ title: `Evidence for ${control.control_id}`, content: body });
  try {
    const exported = await api(bundlePath(siteId, evidence));
    replace(body, details(exported, evidence, control, siteId));
  } catch (error) {
    replace(body);
    showError(body, error);
  }
}
