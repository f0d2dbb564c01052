// Small widgets of the Users and keys page: a secret shown once with a Copy
// button, a confirmation dialog, and state badges for keys and invitations.

import { copy, dialog, h, showError } from "../console.js";

const STATES = {
  active: ["●", "Active"], expiring: ["◐", "Expiring"], revoked: ["–", "Revoked"],
  pending: ["…", "Pending"], used: ["✓", "Accepted"], expired: ["×", "Expired"],
  on: ["✓", "On"], off: ["–", "Off"],
};

/** A state by symbol and word (never by colour alone). */
export function stateBadge(state) {
  const [symbol, word] = STATES[state] || ["•", state];
  return h("span", { class: `badge badge-${state}` }, h("span", { "aria-hidden": "true" }, symbol), " ", word);
}

/** A secret in a read-only field with a Copy button. */
export function secretField(id, label, value) {
  const field = h("input", { id, type: "text", readOnly: true, value, class: "secret mono", spellcheck: false });
  field.addEventListener("focus", () => field.select());
  const button = h("button", { type: "button", onclick: () => copy(value, button) }, "Copy");
  return h("div", { class: "stack" },
    h("label", { for: id }, label),
    h("div", { class: "secret-row" }, field, button));
}

/** A dialog showing what the server returns once (a key, a link). */
export function showOnce({ title, intro, id, label, value, after }) {
  const done = h("button", { type: "button", class: "primary" }, "Done");
  const opened = dialog({
    title,
    content: [
      h("p", { class: "warning" }, h("strong", {}, "Shown only this once. "), intro),
      secretField(id, label, value),
      after || null,
      h("p", { class: "row end" }, done),
    ],
  });
  done.addEventListener("click", opened.close);
  opened.dialog.querySelector(`#${id}`)?.focus();
  return opened;
}

/**
 * Ask before doing something that cannot be undone. `action` runs on
 * confirmation; its failure is shown inside the dialog, which stays open.
 */
export function confirmDialog({ title, text, confirmLabel, action }) {
  const yes = h("button", { type: "button", class: "danger" }, confirmLabel);
  const no = h("button", { type: "button" }, "Cancel");
  const body = h("div", { class: "stack" }, h("p", {}, text), h("p", { class: "row end" }, no, yes));
  const opened = dialog({ title, content: body });
  no.addEventListener("click", opened.close);
  yes.addEventListener("click", async () => {
    yes.disabled = true;
    try {
      await action();
      opened.close();
    } catch (error) {
      showError(body, error);
    } finally {
      yes.disabled = false;
    }
  });
  no.focus();
  return opened;
}
