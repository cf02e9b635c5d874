// The segment builder of the new-broadcast form: tags, attribute conditions and saved segments
// joined by all/any, with the live count of the contacts the filter selects (POST /segments/count).
// Text reaches the page only as text nodes (h) and textContent.
import { api, fill, h, num } from "./lib.js";

const OPERATORS = ["eq", "ne", "in", "exists", "prefix", "gt", "gte", "lt", "lte"];
const NUMERIC = ["gt", "gte", "lt", "lte"];
const COUNT_DELAY_MS = 300;  // after the last change, before the count is asked for

/** One condition row: its element and the condition it reads (null while incomplete). */
function conditionRow(segments, onChange, onRemove) {
  const kind = h("select", { class: "seg-kind", "aria-label": "Condition" },
    h("option", { value: "tag" }, "has tag"),
    h("option", { value: "attribute" }, "attribute"),
    h("option", { value: "segment" }, "in saved segment"));
  const tag = h("input", { class: "seg-tag", placeholder: "tag", "aria-label": "Tag" });
  const name = h("input", { class: "seg-attr", placeholder: "attribute", "aria-label": "Attribute" });
  const op = h("select", { class: "seg-op", "aria-label": "Operator" },
    OPERATORS.map((o) => h("option", { value: o }, o)));
  const value = h("input", { class: "seg-value", placeholder: "value (in: comma-separated)", "aria-label": "Value" });
  const exists = h("select", { class: "seg-exists", "aria-label": "Exists" },
    h("option", { value: "true" }, "true"), h("option", { value: "false" }, "false"));
  const saved = h("select", { class: "seg-saved", "aria-label": "Saved segment" },
    segments.map((s) => h("option", { value: s.name }, s.name)));
  const attribute = h("span", { class: "seg-attribute" }, name, op, value, exists);
  const remove = h("button", { type: "button", class: "secondary seg-remove", onclick: onRemove }, "Remove");
  const row = h("div", { class: "row seg-row" }, kind, tag, attribute, saved, remove);
  const show = () => {
    tag.hidden = kind.value !== "tag";
    attribute.hidden = kind.value !== "attribute";
    saved.hidden = kind.value !== "segment";
    value.hidden = op.value === "exists";
    exists.hidden = op.value !== "exists";
  };
  for (const input of [kind, tag, name, op, value, exists, saved]) {
    input.addEventListener("input", () => { show(); onChange(); });
    input.addEventListener("change", () => { show(); onChange(); });
  }
  show();
  const condition = () => {
    if (kind.value === "tag") return tag.value.trim() ? { tag: tag.value.trim() } : null;
    if (kind.value === "segment") return saved.value ? { segment: saved.value } : null;
    const key = name.value.trim();
    if (!key) return null;
    if (op.value === "exists") return { attribute: key, exists: exists.value === "true" };
    const raw = value.value;
    if (op.value === "in") {
      const items = raw.split(",").map((s) => s.trim()).filter(Boolean);
      return items.length ? { attribute: key, in: items } : null;
    }
    if (NUMERIC.includes(op.value)) {
      // a numeric comparison needs a number; anything else is sent as typed, to be refused
      const n = raw.trim() === "" ? NaN : Number(raw);
      return { attribute: key, [op.value]: Number.isFinite(n) ? n : raw };
    }
    return { attribute: key, [op.value]: raw };
  };
  return { el: row, condition };
}

/** The builder: {el, filter()}; filter() is null when no condition is given (every contact). */
export function segmentBuilder() {
  let rows = [];
  let segments = [];
  let timer = null;
  let asked = 0;  // only the latest count's answer is shown
  const match = h("select", { id: "seg-match", "aria-label": "Match" },
    h("option", { value: "all" }, "all of"), h("option", { value: "any" }, "any of"));
  const list = h("div", { id: "seg-rows" });
  const count = h("span", { id: "seg-count", class: "muted", "aria-live": "polite" });
  const filter = () => {
    const conditions = rows.map((r) => r.condition()).filter(Boolean);
    return conditions.length ? { [match.value]: conditions } : null;
  };
  const recount = () => {
    clearTimeout(timer);
    const f = filter();
    if (!f) { count.textContent = "No condition: every contact."; return; }
    timer = setTimeout(async () => {
      const mine = ++asked;
      try {
        const r = await api("POST", "/segments/count", { json: { filter: f } });
        if (mine === asked) count.textContent = r.count === 1 ? "1 contact matches now." : `${num(r.count)} contacts match now.`;
      } catch (error) {
        if (mine === asked) count.textContent = error.message;
      }
    }, COUNT_DELAY_MS);
  };
  const add = () => {
    const row = conditionRow(segments, recount, () => {
      rows = rows.filter((r) => r !== row);
      row.el.remove();
      recount();
    });
    rows.push(row);
    list.append(row.el);
    recount();
  };
  match.addEventListener("change", recount);
  // enabled once the saved segments are known (a row lists them when it is made)
  const addButton = h("button", { type: "button", class: "secondary", id: "seg-add", onclick: add,
                                  disabled: true }, "Add condition");
  const el = h("fieldset", { class: "panel", id: "segment-builder" },
    h("legend", {}, "Audience"),
    h("div", { class: "row" }, h("span", {}, "Contacts matching"), match, h("span", {}, "these conditions (none: every contact, or the tag above)")),
    list,
    h("div", { class: "row" }, addButton, count));
  api("GET", "/segments").then((r) => { segments = r.segments || []; })
    .catch(() => {}).finally(() => { addButton.disabled = false; });
  fill(count, "No condition: every contact.");
  return { el, filter };
}
