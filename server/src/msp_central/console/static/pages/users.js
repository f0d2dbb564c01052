// The Users and keys page: the partner's console users and their roles,
// invitations, and API keys for automation. Admins manage all three; others
// read the users and are told why the rest is not theirs (the API refuses
// them, and the page says so rather than hiding it).

import { ApiError, api, can, dialog, h, me, notice, paged, query, replace, run, showError, table, time } from "../console.js";
import { confirmDialog, showOnce, stateBadge } from "./users-widgets.js";

const ROLES = ["viewer", "editor", "admin"];
const ROLE_TEXT = {
  viewer: "reads everything",
  editor: "also changes compliance settings, appliances and acknowledges escalations",
  admin: "also manages users, API keys and notification channels",
};
const USERS_PER_PAGE = 50;
const INVITES_PER_PAGE = 20;
const KEYS_PER_PAGE = 50;
const MAX_OVERLAP = 7 * 24 * 60;

const admin = can("admin");
/** How a key is named in buttons and messages (the first key may have no name). */
const keyName = (key) => key.name || `${key.prefix}…`;

/** An explanation in place of what only admins see, with the server's word. */
function adminsOnly(what, ask, error) {
  return h("div", { class: "refused", role: "note" },
    h("p", {}, h("strong", {}, `Only admins see ${what}.`), ` Your role (${me.role || "unknown"}) does not; ask an admin ${ask}.`),
    error instanceof ApiError
      ? h("p", { class: "hint" }, `The server answered ${error.status}: ${error.problem.detail || error.problem.title || error.message}`)
      : null);
}

/**
 * Who did something, as the central log names them: a user of the partner
 * by e-mail once the users are read, an API key by its first characters,
 * an operator's key as such. `users` resolves to the users read.
 */
function actor(text, users) {
  if (!text) return h("span", { class: "muted" }, "—");
  const key = /(?:^|\/)key:([\w-]+)$/.exec(text);
  if (key) return h("span", {}, text.startsWith("admin/") ? "server operator, key " : "API key ", h("code", {}, `${key[1]}…`));
  const user = /\/user:([\w-]+)$/.exec(text);
  const span = h("span", { class: "mono", title: text }, user ? "a user no longer listed" : text);
  if (user) {
    users.then((list) => {
      const found = list.find((u) => u.id === user[1]);
      if (found) {
        span.textContent = found.email;
        span.classList.remove("mono");
      }
    });
  }
  return span;
}

/** A stat for the summary row: a number and its noun (one or many). */
function stat(one, many, id) {
  const value = h("span", { class: "value", id }, "…");
  const noun = h("span", {}, many);
  return {
    element: h("li", {}, value, noun),
    set(count, more) {
      value.textContent = `${count}${more ? "+" : ""}`;
      noun.textContent = count === 1 && !more ? one : many;
    },
  };
}

/** A place under a card's heading for its notices and errors: the newest
 * message replaces the one before, whichever kind it was. */
function messages() {
  const where = h("div", { class: "messages" });
  return {
    element: where,
    ok(text) { where.replaceChildren(); notice(where, text); },
    fail(error) { where.replaceChildren(); showError(where, error); },
  };
}

run(async (root) => {
  const stats = {
    users: stat("user", "users", "stat-users"),
    admins: stat("admin", "admins", "stat-admins"),
    invites: stat("pending invitation", "pending invitations", "stat-invites"),
    keys: stat("active API key", "active API keys", "stat-keys"),
  };
  const summary = h("ul", { class: "stats", "aria-label": "Summary" },
    Object.values(stats).map((s) => s.element));

  // --- users -------------------------------------------------------------
  const usersSay = messages();
  const invitesSay = messages();
  const keysSay = messages();
  const usersCard = h("section", { class: "card", "aria-labelledby": "users-heading" },
    h("h2", { id: "users-heading" }, "Users"),
    usersSay.element,
    h("p", { class: "hint" }, ROLES.map((role) => h("span", { class: "role-note" }, h("strong", {}, role), ": ", ROLE_TEXT[role], ". "))));
  if (!admin) {
    usersCard.append(h("p", { class: "warning", id: "read-only" },
      `Your role (${me.role}) can only read this list: admins invite people, change roles and remove users.`));
  }
  const loadedUsers = [];
  let usersReadNow;
  const usersRead = new Promise((resolve) => { usersReadNow = resolve; });
  let moreUsers = false;
  const roleCell = (user) => {
    if (!admin) return h("span", { class: `role role-${user.role}` }, user.role);
    const select = h("select", { "aria-label": `Role of ${user.email}`, dataset: { user: user.id } },
      ROLES.map((role) => h("option", { value: role, selected: role === user.role }, role)));
    select.addEventListener("change", async () => {
      select.disabled = true;
      try {
        const changed = await api(`/api/v1/users/${encodeURIComponent(user.id)}`, { method: "PATCH", body: { role: select.value } });
        user.role = changed.role;
        usersSay.ok(`${user.email} is now ${changed.role}.`);
        refreshUserStats();
        if (user.email === me.email) location.reload(); // the page follows one's own role
      } catch (error) {
        select.value = user.role;
        usersSay.fail(error);
      } finally {
        select.disabled = false;
      }
    });
    return select;
  };
  const usersTable = table({
    caption: "The partner's console users",
    columns: [
      { label: "E-mail", cell: (u) => [u.email, u.email === me.email ? h("span", { class: "muted" }, " (you)") : null] },
      { label: "Role", cell: roleCell },
      { label: "Two-factor", cell: (u) => stateBadge(u.totp_enabled ? "on" : "off") },
      { label: "Added", cell: (u) => time(u.created_at) },
      { label: "Added by", cell: (u) => actor(u.created_by, usersRead) },
      ...(admin ? [{ label: "Actions", cell: (u) => u.email === me.email
        ? h("span", { class: "muted" }, "—")
        : h("button", { type: "button", class: "danger", onclick: () => removeUser(u) }, h("span", {}, "Remove"),
          h("span", { class: "visually-hidden" }, ` ${u.email}`)) }] : []),
    ],
    empty: "No users.",
  });
  const usersList = paged(usersTable, async (cursor) => {
    const page = await api(`/api/v1/users${query({ limit: USERS_PER_PAGE, cursor })}`);
    if (!cursor) loadedUsers.length = 0;
    loadedUsers.push(...page.items);
    moreUsers = Boolean(page.next_cursor);
    refreshUserStats();
    usersReadNow(loadedUsers);
    return page;
  });
  usersCard.append(usersList);
  function refreshUserStats() {
    stats.users.set(loadedUsers.length, moreUsers);
    stats.admins.set(loadedUsers.filter((u) => u.role === "admin").length, moreUsers);
  }
  function removeUser(user) {
    confirmDialog({
      title: `Remove ${user.email}?`,
      text: `${user.email} loses access at once: their sessions end now. The central log keeps the record of what they did. `
        + "To give them access again, invite them anew.",
      confirmLabel: "Remove user",
      action: async () => {
        await api(`/api/v1/users/${encodeURIComponent(user.id)}`, { method: "DELETE" });
        await usersList.reload();
        usersSay.ok(`${user.email} was removed.`);
      },
    });
  }

  // --- invitations -------------------------------------------------------
  const invitesCard = h("section", { class: "card", "aria-labelledby": "invites-heading" },
    h("h2", { id: "invites-heading" }, "Invitations"), invitesSay.element);
  let invitesList = null;
  if (admin) {
    const email = h("input", { id: "invite-email", type: "email", required: true, autocomplete: "off", maxLength: 254 });
    const role = h("select", { id: "invite-role" }, ROLES.map((r) => h("option", { value: r, selected: r === "viewer" }, r)));
    const send = h("button", { type: "submit", class: "primary" }, "Invite");
    const form = h("form", { class: "invite-form", "aria-labelledby": "invite-form-heading" },
      h("h3", { id: "invite-form-heading" }, "Invite someone"),
      h("div", { class: "row fields" },
        h("span", { class: "stack grow" }, h("label", { for: "invite-email" }, "E-mail address"), email),
        h("span", { class: "stack" }, h("label", { for: "invite-role" }, "Role"), role),
        send),
      h("p", { class: "hint" }, "They get a one-time link to choose their password. It works once, for a limited time."));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      send.disabled = true;
      try {
        const made = await api("/api/v1/user-invites", { method: "POST", body: { email: email.value.trim(), role: role.value } });
        form.reset();
        await invitesList.reload();
        invitesSay.ok(`${made.invite.email} is invited as ${made.invite.role}.`);
        showOnce({
          title: "Invitation link",
          intro: made.emailed
            ? `It was also e-mailed to ${made.invite.email}.`
            : `It was not e-mailed (this server sends no e-mail, or sending failed): give it to ${made.invite.email} yourself, over a channel you trust.`,
          id: "invite-link",
          label: `One-time link for ${made.invite.email}`,
          value: made.link,
          after: h("p", { class: "hint" }, "Valid until ", time(made.invite.expires_at), ". Whoever opens it first makes the account."),
        });
      } catch (error) {
        invitesSay.fail(error);
      } finally {
        send.disabled = false;
      }
    });
    invitesCard.append(form);
  }
  const invitesTable = table({
    caption: "Invitations, newest first",
    columns: [
      { label: "E-mail", cell: (i) => i.email },
      { label: "Role", cell: (i) => i.role },
      { label: "Invited by", cell: (i) => actor(i.created_by, usersRead) },
      { label: "State", cell: (i) => stateBadge(i.state) },
      { label: "Sent", cell: (i) => time(i.created_at) },
      { label: "Expires", cell: (i) => time(i.expires_at) },
      { label: "Actions", cell: (i) => i.state === "pending"
        ? h("button", { type: "button", onclick: () => withdraw(i) }, "Withdraw", h("span", { class: "visually-hidden" }, ` the invitation of ${i.email}`))
        : h("span", { class: "muted" }, "—") },
    ],
    empty: "No invitations yet.",
  });
  function withdraw(invite) {
    confirmDialog({
      title: `Withdraw the invitation of ${invite.email}?`,
      text: "The link stops working at once. You can invite them again later.",
      confirmLabel: "Withdraw invitation",
      action: async () => {
        await api(`/api/v1/user-invites/${encodeURIComponent(invite.id)}`, { method: "DELETE" });
        await invitesList.reload();
        invitesSay.ok(`The invitation of ${invite.email} was withdrawn.`);
      },
    });
  }

  // --- API keys ----------------------------------------------------------
  const keysCard = h("section", { class: "card", "aria-labelledby": "keys-heading" },
    h("h2", { id: "keys-heading" }, "API keys"),
    keysSay.element,
    h("p", { class: "hint" }, "For automation: a key acts as an admin of the partner through the API (",
      h("a", { href: "/api/v1/openapi.json" }, "OpenAPI description"), "). Only its first characters are kept in view; the secret is shown once."));
  let keysList = null;
  if (admin) {
    const name = h("input", { id: "key-name", type: "text", required: true, maxLength: 200, autocomplete: "off", placeholder: "e.g. PSA ticket sync" });
    const create = h("button", { type: "submit", class: "primary" }, "Create key");
    const form = h("form", { class: "row fields", "aria-label": "Create an API key" },
      h("span", { class: "stack grow" }, h("label", { for: "key-name" }, "Name of the new key"), name), create);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      create.disabled = true;
      try {
        const made = await api("/api/v1/api-keys", { method: "POST", body: { name: name.value.trim() } });
        form.reset();
        await keysList.reload();
        keysSay.ok(`API key “${keyName(made.key)}” was created.`);
        showOnce({
          title: "New API key",
          intro: "Copy it into your automation's secret store now: the server keeps only a hash of it.",
          id: "new-key", label: `API key “${keyName(made.key)}”`, value: made.api_key,
          after: h("p", { class: "hint" }, "Send it as ", h("code", {}, "Authorization: Bearer …"), "."),
        });
      } catch (error) {
        keysSay.fail(error);
      } finally {
        create.disabled = false;
      }
    });
    keysCard.append(form);
  }
  const keysTable = table({
    caption: "The partner's API keys",
    columns: [
      { label: "Name", cell: (k) => k.name || h("span", { class: "muted" }, "(no name)") },
      { label: "Starts with", cell: (k) => h("code", {}, `${k.prefix}…`) },
      { label: "State", cell: (k) => [stateBadge(k.state), k.state === "expiring" ? [" until ", time(k.revoked_at)] : null] },
      { label: "Created", cell: (k) => time(k.created_at) },
      { label: "Created by", cell: (k) => actor(k.created_by, usersRead) },
      { label: "Actions", cell: (k) => k.state === "revoked" ? h("span", { class: "muted" }, "—") : h("span", { class: "row actions" },
        h("button", { type: "button", onclick: () => rotate(k) }, "Rotate", h("span", { class: "visually-hidden" }, ` ${keyName(k)}`)),
        k.state === "active"
          ? h("button", { type: "button", class: "danger", onclick: () => revoke(k) }, "Revoke", h("span", { class: "visually-hidden" }, ` ${keyName(k)}`))
          : null) },
    ],
    empty: "No API keys.",
  });
  function revoke(key) {
    confirmDialog({
      title: `Revoke the key “${keyName(key)}”?`,
      text: `Every automation using the key starting ${key.prefix}… is refused from now on. This cannot be undone.`,
      confirmLabel: "Revoke key",
      action: async () => {
        await api(`/api/v1/api-keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
        await keysList.reload();
        keysSay.ok(`API key “${keyName(key)}” was revoked.`);
      },
    });
  }
  function rotate(key) {
    const minutes = h("input", { id: "overlap", type: "number", min: 0, max: MAX_OVERLAP, step: 1, value: "60", required: true, "aria-describedby": "overlap-hint" });
    const go = h("button", { type: "submit", class: "primary" }, "Rotate key");
    const form = h("form", { class: "stack" },
      h("p", {}, `A new key replaces “${keyName(key)}”. The old one keeps working for the overlap, so the automations using it can switch.`),
      h("label", { for: "overlap" }, "Overlap (minutes)"), minutes,
      h("p", { class: "hint", id: "overlap-hint" }, `0 ends the old key now; at most ${MAX_OVERLAP} (a week).`),
      go);
    const opened = dialog({ title: `Rotate the key “${keyName(key)}”`, content: form });
    minutes.focus();
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      go.disabled = true;
      try {
        const made = await api(`/api/v1/api-keys/${encodeURIComponent(key.id)}/rotate`,
          { method: "POST", body: { overlap_minutes: Number(minutes.value) } });
        opened.close();
        await keysList.reload();
        keysSay.ok(`API key “${keyName(key)}” was rotated.`);
        showOnce({
          title: "Rotated API key",
          intro: "Put the new key in place of the old one.",
          id: "new-key", label: `New API key “${keyName(made.key)}”`, value: made.api_key,
          after: h("p", { class: "hint" }, "The old key (", h("code", {}, `${made.previous.prefix}…`), ") works until ",
            time(made.previous.revoked_at), "."),
        });
      } catch (error) {
        showError(form, error);
      } finally {
        go.disabled = false;
      }
    });
  }

  /**
   * A list only admins may read: its first page is asked for whatever the
   * role (the API decides); a refusal is explained in the card instead.
   */
  async function adminList(card, what, ask, path, limit, tableWrap, onPage) {
    let prefetched;
    try {
      prefetched = await api(`${path}${query({ limit })}`);
    } catch (error) {
      if (error instanceof ApiError && error.status === 403) {
        card.append(adminsOnly(what, ask, error));
        return null;
      }
      throw error;
    }
    const list = paged(tableWrap, async (cursor) => {
      const page = prefetched && !cursor ? prefetched : await api(`${path}${query({ limit, cursor })}`);
      prefetched = null;
      onPage(page, cursor);
      return page;
    });
    card.append(list);
    await list.ready;
    return list;
  }

  replace(root, summary, usersCard, invitesCard, keysCard);
  const loadedInvites = [];
  const loadedKeys = [];
  [, invitesList, keysList] = await Promise.all([
    usersList.ready,
    adminList(invitesCard, "invitations", "to invite someone", "/api/v1/user-invites", INVITES_PER_PAGE, invitesTable, (page, cursor) => {
      if (!cursor) loadedInvites.length = 0;
      loadedInvites.push(...page.items);
      const pending = loadedInvites.filter((i) => i.state === "pending").length;
      stats.invites.set(pending, Boolean(page.next_cursor));
    }),
    adminList(keysCard, "API keys", "for a key to automate with", "/api/v1/api-keys", KEYS_PER_PAGE, keysTable, (page, cursor) => {
      if (!cursor) loadedKeys.length = 0;
      loadedKeys.push(...page.items);
      const active = loadedKeys.filter((k) => k.state !== "revoked").length;
      stats.keys.set(active, Boolean(page.next_cursor));
    }),
  ]);
  if (!invitesList) stats.invites.element.remove();
  if (!keysList) stats.keys.element.remove();
});
