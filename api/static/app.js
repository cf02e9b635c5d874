// The pgcast dashboard: views, routing and actions, on the public HTTP API only.
import { RateChart } from "./chart.js";
import { trackingPanel } from "./tracking.js";
import { ApiError, api, claims, duration, fill, h, num, rate, readEvents, session, when,
         whenUnauthorized } from "./lib.js";
import { segmentBuilder } from "./segments.js";

const BROADCAST_STATUSES = ["draft", "scheduled", "sending", "paused", "sent", "failed", "cancelled"];
const RECIPIENT_STATUSES = ["pending", "claimed", "sending", "sent", "failed", "skipped", "unknown", "cancelled"];
const TERMINAL = ["sent", "failed", "cancelled"];
const COUNTERS = ["total", "pending", "sent", "failed", "skipped", "unknown", "cancelled"];
const FEEDBACK = ["delivered", "bounced", "complained"];  // what SES said after the send
const LIST_REFRESH_MS = 3000;
const NOTICE_MS = 6000;
const PAGE = 25;

// Broadcast actions. Each appears when its route is in /openapi.json and the broadcast is in
// one of `when`; adding a route to the dashboard is one entry here.
const ACTIONS = [
  { route: "POST /broadcasts/{id}/send", label: "Send…", when: ["draft", "scheduled"], primary: true,
    confirm: sendConfirm },
  { route: "POST /broadcasts/{id}/schedule", label: "Schedule…", when: ["draft"],
    fields: [{ name: "at", label: "Start at (your local time)", type: "datetime-local", step: 1,
               value: () => localInput(Date.now() + 5 * 60_000), convert: isoWithOffset },
             { name: "not_after", label: "Latest start (optional: a start later than this fails the broadcast)",
               type: "datetime-local", step: 1, optional: true, convert: isoWithOffset }] },
  { route: "POST /broadcasts/{id}/unschedule", label: "Unschedule", when: ["scheduled"] },
  { route: "GET /broadcasts/{id}/preview", label: "Preview…", when: BROADCAST_STATUSES,
    fields: [{ name: "contact", label: "Contact email (empty: a sample contact)", optional: true }],
    query: true, show: true },
  { route: "POST /broadcasts/{id}/test", label: "Test send…", when: ["draft", "scheduled"],
    fields: [{ name: "to", label: "Send to (comma-separated, at most 5)", list: true },
             { name: "contact", label: "Render for contact (optional)", optional: true }],
    done: (r) => `Test message queued for ${(r.test_sends || []).map((t) => t.to).join(", ")}; a running worker sends it.` },
  { route: "POST /broadcasts/{id}/pause", label: "Pause", when: ["sending"] },
  { route: "POST /broadcasts/{id}/resume", label: "Resume", when: ["paused"], primary: true },
  { route: "POST /broadcasts/{id}/retry", label: "Retry failed…", when: ["sent", "failed"],
    fields: [{ name: "include_unknown", label: "Also requeue unknown recipients (they may have been delivered)", type: "checkbox" }] },
  { route: "POST /broadcasts/{id}/copy", label: "Copy", when: BROADCAST_STATUSES,
    done: (r) => `Copied into a new draft, “${r.subject}”.`,
    after: (result) => { location.hash = `#/b/${result.id}`; } },
  { route: "POST /broadcasts/{id}/cancel", label: "Cancel…", when: ["draft", "scheduled", "sending", "paused"],
    danger: true, confirm: () => ({ title: "Cancel this broadcast?", text: "Recipients not yet sent will not be sent. This cannot be undone.", ok: "Cancel broadcast" }) },
  { route: "DELETE /broadcasts/{id}", label: "Delete draft…", when: ["draft"], danger: true,
    confirm: () => ({ title: "Delete this draft?", text: "The draft is removed for good.", ok: "Delete" }),
    after: () => { location.hash = "#/"; } },
];

let features = new Set();  // "METHOD /path" of every route the API serves
let cleanups = [];         // what the current view must stop when another one is shown

const $ = (id) => document.getElementById(id);
const has = (route) => features.has(route);

// ---- errors and notices: the API's own words, nothing silent ------------------------------

function showError(message) {
  fill($("error-text"), String(message));
  $("error").hidden = false;
}
function clearError() { $("error").hidden = true; }
let noticeTimer = null;
function notice(message) {
  // not tied to the view: an action that moves to another view (copy) still says what it did
  fill($("notice"), String(message));
  $("notice").hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { $("notice").hidden = true; }, NOTICE_MS);
}
$("error-close").addEventListener("click", clearError);
window.addEventListener("unhandledrejection", (event) => {
  const reason = event.reason;
  if (reason instanceof ApiError && reason.status === 401) return;  // sign-in shows it
  if (reason && reason.name === "AbortError") return;
  showError(reason && reason.message ? reason.message : String(reason));
});

// ---- dialogs (in the page: never window.alert/confirm) -------------------------------------

function ask({ title, text, ok = "OK", fields = [], danger = false }) {
  const dialog = $("dialog");
  fill($("dialog-title"), title);
  fill($("dialog-text"), text || "");
  const inputs = fields.map((f) => {
    const input = f.type === "checkbox" ? h("input", { type: "checkbox", name: f.name })
      : h("input", { type: f.type || "text", name: f.name, required: !f.optional, step: f.step,
                     value: (typeof f.value === "function" ? f.value() : f.value) || "" });
    return { f, input };
  });
  fill($("dialog-fields"), inputs.map(({ f, input }) => f.type === "checkbox"
    ? h("label", { class: "row" }, input, f.label) : h("label", {}, h("span", {}, f.label), input)));
  $("dialog-ok").textContent = ok;
  $("dialog-ok").className = danger ? "danger" : "";
  return new Promise((resolve) => {
    const form = $("dialog-form");
    const done = (value) => {
      form.removeEventListener("submit", onSubmit);
      $("dialog-cancel").removeEventListener("click", onCancel);
      dialog.removeEventListener("cancel", onCancel);
      if (dialog.open) dialog.close();
      resolve(value);
    };
    const onSubmit = (event) => {
      event.preventDefault();
      const values = {};
      for (const { f, input } of inputs) {
        if (f.type === "checkbox") values[f.name] = input.checked;
        else if (input.value.trim() === "" && f.optional) continue;
        else if (f.list) values[f.name] = input.value.split(",").map((s) => s.trim()).filter(Boolean);
        else values[f.name] = f.convert ? f.convert(input.value) : input.value.trim();
      }
      done(values);
    };
    const onCancel = (event) => { event.preventDefault(); done(null); };
    form.addEventListener("submit", onSubmit);
    $("dialog-cancel").addEventListener("click", onCancel);
    dialog.addEventListener("cancel", onCancel);
    dialog.showModal();
    (inputs[0] ? inputs[0].input : $("dialog-ok")).focus();
  });
}

const pad = (n, width = 2) => String(Math.trunc(Math.abs(n))).padStart(width, "0");

/** A datetime-local value ("2026-12-24T09:00[:00]") as ISO 8601 with the browser's offset then. */
function isoWithOffset(local) {
  const d = new Date(local);  // a date-time without an offset is read as local time
  if (Number.isNaN(d.getTime())) return local;  // the API says what is wrong with it
  const off = -d.getTimezoneOffset();  // minutes east of UTC at that moment (DST included)
  return `${localInput(d)}${off >= 0 ? "+" : "-"}${pad(off / 60)}:${pad(off % 60)}`;
}

/** A moment as a datetime-local value to the second, in the browser's time zone. */
function localInput(moment) {
  const d = new Date(moment);
  return `${pad(d.getFullYear(), 4)}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}` +
    `T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

// ---- sign-in --------------------------------------------------------------------------------

function signOut(message) {
  session.token = null;
  features = new Set();
  renderSignIn(message);
}

whenUnauthorized((message) => {
  // the API gives every 401 the same text; the token's own exp says when it was an expiry
  const c = claims(session.token || "");
  const expired = c && typeof c.exp === "number" && c.exp * 1000 <= Date.now();
  signOut(expired ? `Your token expired at ${new Date(c.exp * 1000).toLocaleTimeString()} (${message}). Paste a new token to continue.`
    : `Signed out: ${message}. Paste a new token to continue.`);
});

async function loadFeatures() {
  const doc = await api("GET", "/openapi.json");
  features = new Set(Object.entries(doc.paths || {}).flatMap(([path, ops]) =>
    Object.keys(ops).map((m) => `${m.toUpperCase()} ${path}`)));
}

function renderSignIn(message) {
  stopView();
  $("nav").hidden = true;
  $("signout").hidden = true;
  fill($("who"));
  const box = h("textarea", { id: "token", placeholder: "eyJhbGciOi…", autocomplete: "off", spellcheck: false });
  const form = h("form", { class: "panel signin", id: "signin", onsubmit: async (event) => {
    event.preventDefault();  // the token never goes into a URL
    const token = box.value.trim();
    if (!token) { fill(msg, "Paste a token first."); msg.hidden = false; return; }
    session.token = token;
    try {
      await loadFeatures();
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) signOut(error.message);
      return;
    }
    clearError();
    if (!location.hash || location.hash === "#/signin") location.hash = "#/";
    route();
  } },
  h("h1", {}, "Sign in"),
  h("p", {}, "Paste a JSON Web Token for your account. An operator mints one with:"),
  h("pre", {}, "pgcast token --account ACCOUNT --sub YOUR-NAME --ttl 3600"),
  h("p", { class: "muted" }, "The token stays in this tab (sessionStorage) and is sent only in the Authorization header."),
  h("label", {}, h("span", {}, "Token"), box),
  h("button", { type: "submit", id: "signin-button" }, "Sign in"));
  const msg = h("p", { id: "signin-message", class: "banner error", role: "alert", hidden: !message }, message || "");
  form.insertBefore(msg, form.children[1]);
  fill($("main"), form);
  box.focus();
}

function showWho() {
  const c = claims(session.token) || {};
  fill($("who"), `${c.sub || "?"} · account ${c.account || "?"}` +
    (c.exp ? ` · until ${new Date(c.exp * 1000).toLocaleTimeString()}` : ""));
  $("nav").hidden = false;
  $("signout").hidden = false;
}
$("signout").addEventListener("click", () => signOut("Signed out."));

// ---- routing ---------------------------------------------------------------------------------

function stopView() {
  for (const stop of cleanups.splice(0)) stop();
}

async function route() {
  stopView();
  if (!session.token) { renderSignIn(); return; }
  if (!features.size) {
    try { await loadFeatures(); } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) signOut(error.message);
      return;
    }
  }
  showWho();
  const hash = location.hash || "#/";
  let m;
  try {
    if ((m = hash.match(/^#\/b\/([0-9a-fA-F-]{36})$/))) await detailView(m[1]);
    else if (hash === "#/new") newView();
    else if (hash === "#/contacts") contactsView();
    else await listView();
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) showError(error.message);
  }
}
window.addEventListener("hashchange", () => { clearError(); route(); });

// ---- pieces ----------------------------------------------------------------------------------

// a subject as its reader sees its shape: merge tags become chips naming the field, not raw
// Jinja (text nodes only: a subject never becomes markup)
function subjectView(subject) {
  const parts = String(subject).split(/(\{\{[\s\S]*?\}\}|\{%[\s\S]*?%\})/);
  return h("span", { class: "subject-view", title: subject }, parts.filter(Boolean).map((part) => {
    const tag = /^\{\{\s*([\s\S]*?)\s*\}\}$/.exec(part);
    if (tag) return h("span", { class: "merge-tag" }, tag[1].replace(/\s*\|[\s\S]*$/, ""));
    return part.startsWith("{%") ? h("span", { class: "merge-tag" }, "…") : part;
  }));
}

function badge(status) { return h("span", { class: `badge ${status}`, "data-status": status }, status); }

// recipients that reached an outcome: cancelled ones never will, so they do not fill the bar
function finished(p) { return p.total - p.pending - (p.cancelled || 0); }

function bar(p, big) {
  const cls = [big ? "big" : "", p.status === "paused" ? "paused" : "", p.status === "sent" ? "done" : ""].join(" ").trim();
  return h("progress", { class: cls, max: Math.max(p.total, 1), value: p.total ? finished(p) : 0 });
}

function pct(p) {
  return p.total ? Math.floor((1000 * finished(p)) / p.total) / 10 : (p.status === "sent" ? 100 : 0);
}

function table(headers, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, headers.map((x) => (typeof x === "string" ? h("th", {}, x) : h("th", x[1], x[0]))))),
    h("tbody", {}, rows));
}

// ---- the list --------------------------------------------------------------------------------

async function listView() {
  const main = $("main");
  const cursors = [null];  // the cursor of every page up to the current one
  const tbody = h("tbody", { id: "broadcasts" });
  const older = h("button", { class: "secondary", id: "older", onclick: () => { cursors.push(next); load(); } }, "Older →");
  const newer = h("button", { class: "secondary", id: "newer", onclick: () => { cursors.pop(); load(); } }, "← Newer");
  let next = null;
  let timer = null;
  let stopped = false;
  cleanups.push(() => { stopped = true; clearTimeout(timer); });
  fill(main,
    h("div", { class: "row" }, h("h1", { class: "grow" }, "Broadcasts"),
      has("POST /broadcasts") ? h("a", { href: "#/new" }, h("button", { type: "button" }, "New broadcast")) : null),
    h("div", { class: "panel" },
      h("table", {},
        h("thead", {}, h("tr", {}, h("th", {}, "Subject"), h("th", {}, "Status"), h("th", {}, "Progress"),
          h("th", { class: "num" }, "Rate"), h("th", { class: "num" }, "ETA"), h("th", {}, "Created"))),
        tbody),
      h("div", { class: "pager" }, newer, older)));

  async function load() {
    clearTimeout(timer);
    const cursor = cursors[cursors.length - 1];
    const page = await api("GET", "/broadcasts", { query: { limit: PAGE, cursor } });
    if (stopped) return;
    next = page.next_cursor;
    newer.disabled = cursors.length === 1;
    older.disabled = !next;
    const live = page.broadcasts.filter((b) => b.status === "sending" || b.status === "paused");
    const progress = new Map(await Promise.all(live.map(async (b) =>
      [b.id, await api("GET", `/broadcasts/${b.id}/progress`)])));
    if (stopped) return;
    fill(tbody, page.broadcasts.length ? page.broadcasts.map((b) => listRow(b, progress.get(b.id)))
      : h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No broadcasts yet.")));
    timer = setTimeout(() => load().catch(reportUnlessSignedOut), LIST_REFRESH_MS);
  }
  await load();
}

function listRow(b, p) {
  let r = p ? p.rate : null;
  let eta = p ? p.eta_seconds : null;
  if (!p && b.started_at && b.finished_at) {
    // the API's own definition of rate, from the row's times (no request per finished row)
    const secs = Math.max((new Date(b.finished_at) - new Date(b.started_at)) / 1000, 0.001);
    r = (b.sent + b.failed + b.skipped + b.unknown) / secs;
    eta = 0;
  }
  const shown = p ? { ...b, ...p } : b;
  return h("tr", { "data-id": b.id },
    h("td", { class: "subject" }, h("a", { href: `#/b/${b.id}` }, subjectView(b.subject))),
    h("td", {}, badge(b.status)),
    h("td", { class: "bar-cell" }, bar(shown), h("small", {}, `${num(finished(shown))} / ${num(shown.total)} · ${pct(shown)}%`)),
    h("td", { class: "num" }, rate(r)),
    h("td", { class: "num" }, TERMINAL.includes(b.status) ? "done" : duration(eta)),
    h("td", { class: "muted" }, when(b.created_at)));
}

function reportUnlessSignedOut(error) {
  if (!(error instanceof ApiError && error.status === 401) && error.name !== "AbortError") showError(error.message);
}

// ---- create and edit -------------------------------------------------------------------------

function contentForm(b, onSave, saveLabel) {
  const field = (name, label, value, tag = "input") => h("label", {}, h("span", {}, label),
    h(tag, { name, value: value || "", id: `f-${name}` }));
  const form = h("form", { class: "panel", id: "content-form", onsubmit: async (event) => {
    event.preventDefault();
    const data = Object.fromEntries(new FormData(form).entries());
    const body = { subject: data.subject, from: data.from, priority: Number(data.priority) || 1 };
    for (const k of ["text", "html", "tag"]) body[k] = data[k].trim() === "" ? null : data[k];
    try { await onSave(body); } catch (error) { reportUnlessSignedOut(error); }
  } },
  h("div", { class: "cols" },
    h("div", {}, field("subject", "Subject", b.subject), field("from", "From", b.from)),
    h("div", {}, field("tag", "Segment tag (empty: every contact)", b.tag),
      h("label", {}, h("span", {}, "Priority within the account, 1–10 (a larger part of its share of the rate)"),
        h("input", { name: "priority", id: "f-priority", type: "number", min: "1", max: "10", step: "1",
                     value: String(b.priority || 1) })))),
  h("div", { class: "cols" }, field("text", "Text body", b.text, "textarea"), field("html", "HTML body", b.html, "textarea")),
  h("button", { type: "submit", id: "save" }, saveLabel));
  return form;
}

function newView() {
  const builder = has("POST /segments/count") ? segmentBuilder() : null;  // segments.js
  const form = contentForm({}, async (body) => {
    for (const k of ["text", "html", "tag"]) if (body[k] === null) delete body[k];
    const filter = builder && builder.filter();
    if (filter) body.filter = filter;
    const b = await api("POST", "/broadcasts", { json: body });
    location.hash = `#/b/${b.id}`;
    if (b.warnings && b.warnings.length) notice(b.warnings.join(" "));
  }, "Create draft");
  if (builder) form.insertBefore(builder.el, form.querySelector("#save"));
  fill($("main"), h("h1", {}, "New broadcast"), form);
}

// ---- the detail view -------------------------------------------------------------------------

async function detailView(id) {
  const controller = new AbortController();
  cleanups.push(() => controller.abort());
  let b = await api("GET", `/broadcasts/${id}`, { signal: controller.signal });
  const main = $("main");
  const el = {
    title: h("h1", { id: "subject" }),
    status: h("span", { id: "status" }),
    actions: h("div", { class: "actions", id: "actions" }),
    reason: h("div", { class: "reason", id: "paused-reason", hidden: true }),
    pct: h("span", { class: "pct", id: "pct" }),
    of: h("span", { id: "of" }),
    rate: h("span", { id: "rate" }),
    eta: h("span", { id: "eta" }),
    share: h("span", { id: "share", class: "muted" }),
    bar: h("div", { id: "bar" }),
    counters: h("div", { class: "counters", id: "counters" }),
    feedback: h("div", { class: "counters", id: "feedback", "aria-label": "SES feedback" }),
    audience: h("span", { id: "audience", class: "muted" }),
    canvas: h("canvas", { class: "chart", id: "chart" }),
    audit: h("tbody", { id: "audit" }),
    info: h("dl", { class: "kv", id: "info" }),
    content: h("div", { id: "content" }),
    recipients: h("tbody", { id: "recipients" }),
  };
  const tracking = has("GET /broadcasts/{id}/stats") ? trackingPanel(id, controller.signal) : null;
  fill(main,
    h("div", { class: "title" }, el.title, el.status),
    h("div", { class: "panel" },
      el.actions, el.reason,
      h("div", { class: "headline" }, el.pct, el.of, h("span", { class: "spacer grow" }), el.share, el.rate, el.eta),
      el.bar, el.counters, el.feedback, el.audience),
    h("div", { class: "panel" }, h("h2", {}, "Messages per second"), el.canvas),
    tracking ? tracking.panel : null,
    h("div", { class: "cols" },
      h("div", { class: "panel" }, h("h2", {}, "Broadcast"), el.info, el.content),
      h("div", { class: "panel" }, h("h2", {}, "Audit log"),
        has("GET /broadcasts/{id}/audit") ? table(["When", "Action", "From → to", "Details"], [], { id: "audit-table" }) : h("p", { class: "muted" }, "This API does not serve the audit log."))),
    recipientsPanel(id, el, controller.signal));
  const auditTable = main.querySelector("#audit-table");
  if (auditTable) auditTable.replaceChild(el.audit, auditTable.tBodies[0]);

  const chart = new RateChart(el.canvas);
  let last = { status: b.status, ...Object.fromEntries(COUNTERS.map((k) => [k, b[k]])), rate: null, eta_seconds: null };

  function renderBroadcast() {
    fill(el.title, subjectView(b.subject));
    fill(el.status, badge(b.status));
    renderActions(b, el.actions, refresh);
    el.reason.hidden = !b.paused_reason;
    fill(el.reason, b.paused_reason ? `Paused: ${b.paused_reason}` : "");
    fill(el.info,
      ...[["From", b.from], ["Segment", (b.filter_used || b.filter) ? JSON.stringify(b.filter_used || b.filter)
        : b.tag ? `tag “${b.tag}”` : "every contact"], ["Id", b.id],
          ["Priority", String(b.priority || 1)], ["Created", when(b.created_at)], ["Started", when(b.started_at)], ["Finished", when(b.finished_at)],
          ...(b.scheduled_at ? [["Scheduled", when(b.scheduled_at)]] : []),
          ...(b.not_after ? [["Latest start", when(b.not_after)]] : []),
          ...(b.failed_reason ? [["Failed because", b.failed_reason]] : [])]
        .flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    if (b.status === "draft") {
      fill(el.content, contentForm(b, async (body) => {
        b = await api("PATCH", `/broadcasts/${id}`, { json: body });
        notice(["Draft saved.", ...(b.warnings || [])].join(" "));
        renderBroadcast();
      }, "Save draft"));
    } else {
      fill(el.content, b.text !== null ? [h("h2", {}, "Text"), h("pre", { id: "text-body" }, b.text)] : null,
        b.html !== null ? [h("h2", {}, "HTML (source)"), h("pre", { id: "html-body" }, b.html)] : null);
    }
  }

  function renderProgress(p) {
    last = p;
    fill(el.pct, `${pct(p)}%`);
    fill(el.of, `${num(finished(p))} of ${num(p.total)} recipients finished`);
    fill(el.rate, `rate ${rate(p.rate)}`);
    // its fair share of the global rate while it takes tokens (none without a limit)
    fill(el.share, p.share_per_second === null || p.share_per_second === undefined ? "" : `share ${rate(p.share_per_second)}`);
    fill(el.eta, `ETA ${p.status === "paused" ? "paused" : TERMINAL.includes(p.status) ? "done" : duration(p.eta_seconds)}`);
    fill(el.bar, bar(p, true));
    fill(el.counters, COUNTERS.map((k) => h("div", { class: `counter${(k === "failed" || k === "unknown") && p[k] ? " bad" : ""}`, "data-counter": k },
      h("b", { id: `count-${k}` }, num(p[k])), h("span", {}, k))));
    // delivered / bounced / complained: annotations of sent rows, from the SES events
    fill(el.feedback, FEEDBACK.filter((k) => k in p).map((k) => h("div", { class: `counter${k !== "delivered" && p[k] ? " bad" : ""}`, "data-counter": k },
      h("b", { id: `count-${k}` }, num(p[k])), h("span", {}, k))));
  }

  async function refresh() {
    b = await api("GET", `/broadcasts/${id}`, { signal: controller.signal });
    renderBroadcast();
    renderProgress({ ...last, status: b.status });
    // a retry takes a finished broadcast back to sending: its ended stream must be opened again
    if (!TERMINAL.includes(b.status)) watch();
    await Promise.all([loadAudit(), loadAudience(), tracking ? tracking.reload() : null]);
  }

  async function loadAudit() {
    if (!has("GET /broadcasts/{id}/audit")) return;
    const { audit_log: log } = await api("GET", `/broadcasts/${id}/audit`, { signal: controller.signal });
    fill(el.audit, log.slice().reverse().map((e) => h("tr", {},
      h("td", { class: "muted" }, when(e.at)), h("td", {}, e.action ?? ""),
      h("td", {}, `${e.from ?? "–"} → ${e.to ?? "–"}`),
      h("td", { class: "mono" }, e.details ? JSON.stringify(e.details) : ""))));
  }

  async function loadAudience() {
    if (b.status !== "draft" || !has("GET /broadcasts/{id}/audience")) { fill(el.audience); return; }
    const a = await api("GET", `/broadcasts/${id}/audience`, { signal: controller.signal });
    fill(el.audience, `Sending now would reach ${num(a.audience)} contacts.`);
  }

  // live progress: the event stream, read with fetch so the token stays in the header; one
  // stream at a time, until `done` (opened again by refresh() when the broadcast runs again)
  let watching = false;
  let again = false;  // asked to watch while a stream was still open: open one after its `done`
  function watch() {
    if (controller.signal.aborted) return;
    if (watching) { again = true; return; }
    watching = true;
    again = false;
    stream().finally(() => { watching = false; if (again) watch(); });
  }

  async function stream() {
    let wait = 3000;
    let interrupted = false;
    while (!controller.signal.aborted) {
      let ended = false;
      try {
        const retry = await readEvents(`/broadcasts/${id}/events`, (name, data) => {
          if (interrupted) { interrupted = false; clearError(); }  // back: the banner is stale
          if (name === "gone") { ended = true; showError(data.message); return; }
          if (name === "expired") { wait = 0; return; }  // the token ran out: asking again signs out
          if (name !== "progress" && name !== "done") return;
          chart.add(data);
          const changed = data.status !== b.status;
          renderProgress(data);
          if (changed) refresh().catch(reportUnlessSignedOut);
          if (name === "done") { ended = true; again = false; }
        }, controller.signal);
        if (retry && wait) wait = retry;
      } catch (error) {
        if (controller.signal.aborted || (error instanceof ApiError && error.status === 401)) return;
        interrupted = true;
        showError(`Live progress interrupted: ${error.message}; reconnecting…`);
      }
      if (ended) return;
      // the server closed the stream (a restart): come back after the delay it asked for
      await new Promise((resolve) => { const t = setTimeout(resolve, wait); cleanups.push(() => clearTimeout(t)); });
    }
  }

  renderBroadcast();
  renderProgress(last);
  watch();
  await Promise.all([loadAudit(), loadAudience(), tracking ? tracking.reload() : null]);
}

function recipientsPanel(id, el, signal) {
  const select = h("select", { id: "recipient-status" },
    h("option", { value: "" }, "all statuses"),
    RECIPIENT_STATUSES.map((s) => h("option", { value: s }, s)));
  const nextButton = h("button", { class: "secondary", id: "recipients-next" }, "Next page →");
  const firstButton = h("button", { class: "secondary", id: "recipients-first" }, "First page");
  let cursor = null;
  let next = null;
  async function load() {
    const page = await api("GET", `/broadcasts/${id}/recipients`, { query: { status: select.value, cursor, limit: PAGE }, signal });
    next = page.next_cursor;
    nextButton.disabled = !next;
    firstButton.disabled = cursor === null;
    fill(el.recipients, page.recipients.length ? page.recipients.map((r) => h("tr", {},
      h("td", {}, r.email), h("td", {}, badge(r.status)), h("td", { class: "num" }, r.attempts),
      h("td", {}, r.last_error ?? ""), h("td", { class: "muted" }, when(r.sent_at))))
      : h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No recipients here.")));
  }
  select.addEventListener("change", () => { cursor = null; load().catch(reportUnlessSignedOut); });
  nextButton.addEventListener("click", () => { cursor = next; load().catch(reportUnlessSignedOut); });
  firstButton.addEventListener("click", () => { cursor = null; load().catch(reportUnlessSignedOut); });
  const refresh = h("button", { class: "secondary", onclick: () => load().catch(reportUnlessSignedOut) }, "Refresh");
  load().catch(reportUnlessSignedOut);
  const t = table(["Email", "Status", ["Attempts", { class: "num" }], "Last error", "Sent at"], [], { id: "recipients-table" });
  t.replaceChild(el.recipients, t.tBodies[0]);
  return h("div", { class: "panel" },
    h("div", { class: "row" }, h("h2", { class: "grow" }, "Recipients"), h("label", {}, h("span", {}, "Status"), select), refresh),
    t, h("div", { class: "pager" }, firstButton, nextButton));
}

function renderActions(b, box, refresh) {
  const buttons = ACTIONS.filter((a) => has(a.route) && a.when.includes(b.status)).map((a) => {
    const cls = a.danger ? "danger" : a.primary ? "" : "secondary";
    const slug = a.route.split("/").pop().replace("{id}", "delete");
    return h("button", { type: "button", class: cls, "data-action": slug, onclick: (event) => runAction(a, b, event.currentTarget, refresh) }, a.label);
  });
  fill(box, buttons.length ? buttons : h("span", { class: "muted" }, "No actions for a broadcast in this status."));
}

async function runAction(action, b, button, refresh) {
  let values = {};
  if (action.confirm) {
    const c = await action.confirm(b);
    if (!(await ask({ ...c, danger: action.danger }))) return;
  }
  if (action.fields) {
    values = await ask({ title: action.label.replace("…", ""), fields: action.fields, ok: action.label.replace("…", "") });
    if (!values) return;
  }
  const [method, template] = action.route.split(" ");
  const path = template.replace("{id}", b.id);
  button.disabled = true;
  try {
    const result = action.query ? await api(method, path, { query: values })
      : await api(method, path, method === "POST" ? { json: values } : {});
    if (action.show) {
      await ask({ title: action.label.replace("…", ""), text: JSON.stringify(result, null, 2) });
    } else if (action.done) notice(action.done(result));
    else if (result && typeof result.message === "string") notice(result.message);
    else notice(`${action.label.replace("…", "")}: done.`);
    if (action.after) action.after(result);
    else await refresh();
  } catch (error) {
    reportUnlessSignedOut(error);
  } finally {
    button.disabled = false;
  }
}

async function sendConfirm(b) {
  let reach = "every contact in its segment";
  if (has("GET /broadcasts/{id}/audience")) {
    const a = await api("GET", `/broadcasts/${b.id}/audience`);
    reach = `${num(a.audience)} recipient${a.audience === 1 ? "" : "s"}`;
  }
  return { title: "Send this broadcast?", text: `“${b.subject}” will go to ${reach}. Sending starts at once.`, ok: "Send now" };
}

// ---- contacts --------------------------------------------------------------------------------

function contactsView() {
  const main = $("main");
  const panels = [h("h1", {}, "Contacts")];
  const list = has("GET /contacts") ? contactsList() : null;
  const changed = () => { if (list) list.reload(); };  // the list shows what an edit did
  if (has("POST /contacts/import")) {
    const file = h("input", { type: "file", accept: ".csv,text/csv", id: "csv-file" });
    // sent as the Content-Type's charset: a file Excel saved on Windows is often not UTF-8
    const encoding = h("select", { id: "csv-encoding", "aria-label": "File encoding" },
      h("option", { value: "utf-8" }, "UTF-8"),
      h("option", { value: "windows-1252" }, "Windows-1252 (Excel, Western)"),
      h("option", { value: "iso-8859-1" }, "Latin-1 (ISO-8859-1)"));
    const report = h("div", { id: "import-report" });
    panels.push(h("form", { class: "panel", id: "import-form", onsubmit: async (event) => {
      event.preventDefault();
      if (!file.files.length) { showError("Choose a CSV file first."); return; }
      fill(report, h("p", { class: "muted" }, "Importing…"));
      try {
        const r = await api("POST", "/contacts/import", { raw: file.files[0], contentType: `text/csv; charset=${encoding.value}` });
        fill(report, h("p", { id: "import-summary" }, `Imported ${num(r.imported)} contacts; ${num(r.rejected.length)} rows rejected.`),
          r.rejected.length ? table(["Line", "Email", "Reason"], r.rejected.map((x) =>
            h("tr", {}, h("td", { class: "num" }, x.line), h("td", {}, x.email), h("td", {}, x.reason)))) : null);
        changed();
      } catch (error) { fill(report); reportUnlessSignedOut(error); }
    } },
    h("h2", {}, "Import a CSV"),
    h("p", { class: "muted" }, "Header email,name,tags (tags separated by ;). The same import as pgcast contacts import: rows with a bad address are listed with their line; the others are upserted."),
    h("div", { class: "row" }, h("div", { class: "grow" }, file), encoding, h("button", { type: "submit", id: "import" }, "Import")), report));
  }
  if (has("POST /contacts")) {
    panels.push(h("form", { class: "panel", id: "add-contact", onsubmit: async (event) => {
      event.preventDefault();
      const f = new FormData(event.target);
      const tags = String(f.get("tags")).split(",").map((s) => s.trim()).filter(Boolean);
      const attributes = parseAttributes(String(f.get("attributes")));
      if (typeof attributes === "string") { showError(attributes); return; }
      try {
        const r = await api("POST", "/contacts", { json: { contacts: [{ email: f.get("email"), name: f.get("name") || null, tags, attributes }] } });
        if (r.rejected.length) showError(r.rejected[0].reason); else { notice(`Saved ${f.get("email")}.`); changed(); }
      } catch (error) { reportUnlessSignedOut(error); }
    } }, h("h2", {}, "Add or update a contact"),
    h("div", { class: "cols" }, h("label", {}, h("span", {}, "Email"), h("input", { name: "email", required: true })),
      h("label", {}, h("span", {}, "Name"), h("input", { name: "name" }))),
    h("label", {}, h("span", {}, "Tags (comma-separated)"), h("input", { name: "tags" })),
    h("label", {}, h("span", {}, "Attributes for merge tags (one key=value a line; given ones replace, the others stay)"),
      h("textarea", { name: "attributes", id: "contact-attributes", rows: 3, placeholder: "plan=pro\ncity=Oslo" })),
    h("button", { type: "submit" }, "Save contact")));
  }
  if (has("POST /contacts/unsubscribe")) {
    panels.push(h("form", { class: "panel", id: "unsubscribe-form", onsubmit: async (event) => {
      event.preventDefault();
      const email = new FormData(event.target).get("email");
      try {
        const r = await api("POST", "/contacts/unsubscribe", { json: { email } });
        notice(`${r.email} unsubscribed at ${when(r.unsubscribed_at)}.`);
        changed();
      } catch (error) { reportUnlessSignedOut(error); }
    } }, h("h2", {}, "Unsubscribe"),
    h("div", { class: "row" }, h("input", { name: "email", required: true, class: "grow", placeholder: "someone@example.com" }),
      h("button", { type: "submit", class: "danger" }, "Unsubscribe"))));
  }
  if (list) panels.push(list.panel);
  fill(main, panels);
}

const CONTACT_STATUSES = ["subscribed", "unsubscribed", "suppressed"];

// "key=value" lines as string attributes (as a CSV column gives them); a message when malformed
function parseAttributes(text) {
  const out = {};
  for (const [i, line] of text.split("\n").entries()) {
    if (!line.trim()) continue;
    const at = line.indexOf("=");
    if (at < 1 || !line.slice(0, at).trim()) return `Attributes, line ${i + 1}: write key=value`;
    out[line.slice(0, at).trim()] = line.slice(at + 1).trim();
  }
  return out;
}

function attributesText(attributes) {
  return Object.entries(attributes || {}).map(([k, v]) => `${k}=${v}`).join(", ");
}

// the row's own actions: resubscribe an unsubscribed contact, erase anyone (asked first)
function contactActions(c, reload) {
  const buttons = [];
  if (c.unsubscribed_at && has("POST /contacts/resubscribe")) {
    buttons.push(h("button", { class: "secondary small", "data-action": "resubscribe", onclick: async () => {
      const ok = await ask({ title: `Resubscribe ${c.email}?`, text: "Only when they asked to be mailed again: it is recorded with your name.", ok: "Resubscribe" });
      if (!ok) return;
      try {
        const r = await api("POST", "/contacts/resubscribe", { json: { email: c.email } });
        notice(r.message); reload();
      } catch (error) { reportUnlessSignedOut(error); }
    } }, "Resubscribe"));
  }
  if (has("POST /contacts/erase")) {
    buttons.push(h("button", { class: "danger small", "data-action": "erase", onclick: async () => {
      const ok = await ask({ title: `Erase ${c.email}?`, text: "Their address, name, tags and attributes are deleted, here and in every broadcast's recipients; only a hash is kept so the address is never imported again. This cannot be undone.", ok: "Erase", danger: true });
      if (!ok) return;
      try {
        const r = await api("POST", "/contacts/erase", { json: { email: c.email } });
        notice(r.message); reload();
      } catch (error) { reportUnlessSignedOut(error); }
    } }, "Erase"));
  }
  return buttons;
}

function contactsList() {
  // GET /contacts: by address, keyset-paged; the default view is the unfiltered key walk
  const tbody = h("tbody", { id: "contacts" });
  const status = h("select", { id: "contact-status" }, h("option", { value: "" }, "all statuses"),
    CONTACT_STATUSES.map((x) => h("option", { value: x }, x)));
  const tag = h("input", { id: "contact-tag", placeholder: "any tag", autocomplete: "off" });
  const nextButton = h("button", { class: "secondary", id: "contacts-next" }, "Next page →");
  const firstButton = h("button", { class: "secondary", id: "contacts-first" }, "First page");
  let cursor = null;
  let next = null;
  let loads = 0;
  async function load() {
    const mine = ++loads;  // a filter change, a reload and a page can be in flight at once
    const page = await api("GET", "/contacts", { query: { status: status.value, tag: tag.value.trim(), cursor, limit: PAGE } });
    if (mine !== loads) return;  // a later load's answer is the one shown (and its cursor)
    next = page.next_cursor;
    nextButton.disabled = !next;
    firstButton.disabled = cursor === null;
    fill(tbody, page.contacts.length ? page.contacts.map((c) => h("tr", { "data-email": c.email },
      h("td", {}, c.email), h("td", {}, c.name ?? ""), h("td", {}, (c.tags || []).join(", ")),
      h("td", { class: "attributes" }, attributesText(c.attributes)),
      h("td", {}, h("span", { class: `badge ${c.status}`, "data-status": c.status }, c.status),
        c.suppressed_reason ? ` (${c.suppressed_reason})` : ""),
      h("td", { class: "muted" }, when(c.unsubscribed_at)), h("td", { class: "muted" }, when(c.created_at)),
      h("td", { class: "row-actions" }, contactActions(c, reload))))
      : h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No contacts here.")));
  }
  const reload = () => { cursor = null; return load().catch(reportUnlessSignedOut); };
  status.addEventListener("change", reload);
  tag.addEventListener("change", reload);
  nextButton.addEventListener("click", () => { cursor = next; load().catch(reportUnlessSignedOut); });
  firstButton.addEventListener("click", reload);
  reload();
  const t = table(["Email", "Name", "Tags", "Attributes", "Status", "Unsubscribed", "Added", ""], [], { id: "contacts-table" });
  t.replaceChild(tbody, t.tBodies[0]);
  const panel = h("div", { class: "panel", id: "contacts-list" },
    h("div", { class: "row" }, h("h2", { class: "grow" }, "All contacts"),
      h("label", {}, h("span", {}, "Status"), status), h("label", {}, h("span", {}, "Tag"), tag)),
    t, h("div", { class: "pager" }, firstButton, nextButton));
  return { panel, reload };
}

route();
