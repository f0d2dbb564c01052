// The Compliance page: which frameworks the partner's sites run, the
// partner's defaults (and the industry presets that set them, previewed
// before they are applied), and each site's own settings over them.
import { api, can, h, notice, replace, run, showError } from "../console.js";
import { checkedValues, frameworkChecks, industrySelect, readOnlyNote, tierRadios, warningList } from "./compliance-form.js";
import { usageCard, summaryStats } from "./compliance-usage.js";
import { presetPreview } from "./compliance-preset.js";
import { sitesCard } from "./compliance-sites.js";

run(async (root) => {
  const [partner, presets, usage] = await Promise.all([
    api("/api/v1/partner"),
    api("/api/v1/presets"),
    api("/api/v1/framework-usage"),
  ]);
  const state = { partner, presets, usage, catalogue: usage.frameworks };
  const names = new Map(usage.frameworks.map((f) => [f.framework, f.name]));
  const industryName = (id) => presets.find((p) => p.id === id)?.name ?? (id || "None");
  state.names = names;
  state.industryName = industryName;

  const messages = h("div", { class: "messages" });
  const stats = h("div");
  const usageSlot = h("div");
  const defaultsSlot = h("section", { class: "card", "aria-labelledby": "defaults-title" });
  const presetsSlot = h("section", { class: "card", "aria-labelledby": "presets-title" });

  /** Read the usage again and redraw what depends on it. */
  async function refreshUsage() {
    state.usage = await api("/api/v1/framework-usage");
    state.catalogue = state.usage.frameworks;
    drawUsage();
    sites.reload();
  }
  function drawUsage() {
    replace(stats, summaryStats(state));
    replace(usageSlot, usageCard(state));
  }

  function drawDefaults() {
    const d = state.partner.defaults;
    const form = h("form", { class: "stack defaults-form", novalidate: true },
      h("fieldset", { class: "plain", disabled: !can("edit") },
        h("div", { class: "stack" },
          h("label", { for: "default-industry" }, "Industry"),
          industrySelect("default-industry", presets, d.industry)),
        h("fieldset", {}, h("legend", {}, "Tier"), tierRadios("default-tier", d.tier)),
        h("fieldset", {}, h("legend", {}, "Frameworks"),
          frameworkChecks(state.catalogue, d.frameworks, "default-frameworks")),
        h("button", { type: "submit", class: "primary" }, "Save defaults")));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        const saved = await api("/api/v1/partner/defaults", {
          method: "PATCH",
          patch: true,
          body: {
            industry: form.querySelector("#default-industry").value || null,
            tier: checkedValues(form, "default-tier")[0] || null,
            frameworks: checkedValues(form, "default-frameworks"),
          },
        });
        state.partner = saved;
        await refreshUsage();
        drawDefaults();
        drawPresets();
        const box = notice(defaultsSlot, "Defaults saved. Sites that inherit them now use them.");
        const warned = warningList(saved.warnings);
        if (warned) box.after(warned);
      } catch (error) {
        showError(defaultsSlot, error);
        button.disabled = false;
      }
    });
    replace(defaultsSlot,
      h("h2", { id: "defaults-title" }, "Partner defaults"),
      h("p", { class: "hint" }, "Every site uses these unless it overrides a setting of its own."),
      readOnlyNote(),
      form);
  }

  function drawPresets() {
    const current = state.partner.defaults;
    replace(presetsSlot,
      h("h2", { id: "presets-title" }, "Industry presets"),
      h("p", { class: "hint" },
        "A preset sets the defaults' industry, tier and frameworks in one step. You see what changes before anything is applied."),
      h("ul", { class: "presets" }, presets.map((preset) => h("li", {},
        h("button", {
          type: "button",
          class: "preset",
          "aria-describedby": `preset-${preset.id}`,
          onclick: () => presetPreview(state, preset, async (applied) => {
            state.partner = applied;
            await refreshUsage();
            drawDefaults();
            drawPresets();
            notice(messages, `The ${preset.name} preset is now your defaults.`);
          }),
        }, preset.name, preset.id === current.industry ? h("span", { class: "current" }, " (current)") : null),
        h("span", { class: "hint", id: `preset-${preset.id}` },
          `${preset.tier === "full" ? "Full" : "Basic"} tier · `,
          preset.frameworks.map((f) => names.get(f) ?? f).join(", "))))));
  }

  const sites = sitesCard(state, refreshUsage);
  drawUsage();
  drawDefaults();
  drawPresets();
  replace(root,
    messages,
    stats,
    usageSlot,
    h("div", { class: "grid settings-grid" }, defaultsSlot, presetsSlot),
    sites);
});
