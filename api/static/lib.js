// The dashboard's plumbing: DOM building (text only), the API client, the event-stream reader.
// User data only ever reaches the page through text nodes and textContent, never as markup.

const TOKEN_KEY = "pgcast.token";

/** h("td", {class: "num"}, "12", child): an element; strings become text nodes. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key in el && key !== "list" && key !== "form") el[key] = value;  // a property
    else if (value !== false) el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
  return el;
}

/** The token's claims (unverified: only to show who is signed in and until when). */
export function claims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
  } catch {
    return null;
  }
}

export const session = {
  get token() { return sessionStorage.getItem(TOKEN_KEY); },
  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
};

/** An API answer that is not 2xx: the API's own message, its status and body. */
export class ApiError extends Error {
  constructor(status, body) {
    const text = body && typeof body === "object" && typeof body.message === "string"
      ? body.message : `HTTP ${status}${typeof body === "string" && body ? ": " + body : ""}`;
    super(text);
    this.status = status;
    this.body = body;
  }
}

/** Called with the API's message when a token is refused (401): back to sign-in. */
let onUnauthorized = () => {};
export function whenUnauthorized(callback) { onUnauthorized = callback; }

function headers(extra) {
  const out = { Accept: "application/json", ...extra };
  const token = session.token;
  if (token) out.Authorization = `Bearer ${token}`;  // the token travels in the header only
  return out;
}

async function body(response) {
  const text = await response.text();
  if (!text) return null;
  try { return JSON.parse(text); } catch { return text; }
}

/** One API call; JSON in and out; throws ApiError with the API's words. */
export async function api(method, path, { json, raw, contentType, query, signal } = {}) {
  let url = path;
  if (query) {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== null && v !== undefined && v !== "") params.set(k, v);
    const qs = params.toString();
    if (qs) url += "?" + qs;
  }
  const init = { method, headers: headers(), signal, cache: "no-store" };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (raw !== undefined) {
    init.headers["Content-Type"] = contentType;
    init.body = raw;
  }
  const response = await fetch(url, init);
  const data = await body(response);
  if (response.status === 401) {
    const error = new ApiError(401, data);
    onUnauthorized(error.message);
    throw error;
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

/**
 * Read GET `path` as Server-Sent Events with fetch (so the token goes in the header, which
 * EventSource cannot do), calling onEvent(name, data) for each event. Resolves when the
 * server closes the stream; rejects on a network error or a non-2xx answer.
 */
export async function readEvents(path, onEvent, signal) {
  const response = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal,
                                       cache: "no-store" });
  if (response.status === 401) {
    const error = new ApiError(401, await body(response));
    onUnauthorized(error.message);
    throw error;
  }
  if (!response.ok) throw new ApiError(response.status, await body(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let retry = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;  // a keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = val;
        else if (field === "data") data.push(val);
        else if (field === "retry") retry = Number(val);
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
  return retry;
}

/** "1,234". */
export function num(n) { return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"); }

/** "4m 05s" for an ETA in seconds. */
export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

/** "142.5/s". */
export function rate(r) { return r === null || r === undefined ? "–" : `${Number(r).toLocaleString("en-US", { maximumFractionDigits: 1 })}/s`; }

/** A timestamp in the reader's local time. */
export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}
