// Opens and clicks of one broadcast (GET /broadcasts/{id}/stats): counters, an hourly chart
// of human and machine events, and the per-link table. User data (URLs) only as text.
import { api, fill, h, num } from "./lib.js";

const KINDS = [["open", "opens", "#2f6fdf"], ["click", "clicks", "#12a150"]];

/** The panel; it loads itself now and whenever `reload()` is called. */
export function trackingPanel(id, signal) {
  const el = {
    mode: h("span", { id: "track-mode", class: "muted" }),
    counters: h("div", { class: "counters", id: "tracking-counters" }),
    canvas: h("canvas", { class: "chart", id: "tracking-chart" }),
    links: h("tbody", { id: "tracking-links" }),
  };
  const panel = h("div", { class: "panel", id: "tracking" },
    h("h2", {}, "Opens and clicks ", el.mode), el.counters, el.canvas,
    h("table", { id: "tracking-links-table" },
      h("thead", {}, h("tr", {}, ...["Link", "Clicks", "Human", "Machine", "Unique"].map((t) => h("th", {}, t)))),
      el.links));

  async function reload() {
    const s = await api("GET", `/broadcasts/${id}/stats`, { signal });
    fill(el.mode, s.track === "none" ? "(not tracked)" : `(${s.track})`);
    const cell = (key, label, value) => h("div", { class: "counter", "data-counter": key },
      h("b", { id: `stat-${key}` }, num(value)), h("span", {}, label));
    fill(el.counters,
      cell("unsubscribed", "unsubscribed", s.unsubscribed),
      ...KINDS.flatMap(([, name]) => [
        cell(`${name}-human`, `${name} (human)`, s[name].human),
        cell(`${name}-machine`, `${name} (machine)`, s[name].machine),
        cell(`${name}-unique`, `unique ${name}`, s[name].unique)]));
    fill(el.links, s.links.map((l) => h("tr", { "data-link": String(l.index) },
      h("td", { class: "mono url" }, l.url), h("td", { class: "num" }, num(l.clicks)),
      h("td", { class: "num" }, num(l.human)), h("td", { class: "num" }, num(l.machine)),
      h("td", { class: "num" }, num(l.unique)))));
    drawSeries(el.canvas, s.series);
    return s;
  }

  return { panel, reload };
}

/** Human (solid) and machine (dashed) opens and clicks per hour. */
export function drawSeries(c, series) {
  const hours = [...new Set(series.map((p) => p.hour))].sort();
  c.dataset.points = String(series.length);
  const ratio = window.devicePixelRatio || 1;
  const width = c.clientWidth || 600, height = c.clientHeight || 200;
  c.width = Math.round(width * ratio);
  c.height = Math.round(height * ratio);
  const g = c.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  const left = 56, right = 12, top = 12, bottom = 26;
  const w = width - left - right, hgt = height - top - bottom;
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#667085";
  if (!hours.length) {
    g.textAlign = "center"; g.textBaseline = "middle";
    g.fillText("opens and clicks per hour appear here", left + w / 2, top + hgt / 2);
    return;
  }
  const value = (hour, kind, which) => {
    const p = series.find((q) => q.hour === hour && q.kind === kind);
    return p ? p[which] : 0;
  };
  const max = Math.max(1, ...series.map((p) => Math.max(p.human, p.machine)));
  const x = (i) => left + (hours.length === 1 ? w / 2 : (w * i) / (hours.length - 1));
  const y = (v) => top + hgt - (hgt * v) / max;
  g.strokeStyle = "#e3e6eb"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const yy = top + hgt - (hgt * i) / 4;
    g.beginPath(); g.moveTo(left, yy + 0.5); g.lineTo(left + w, yy + 0.5); g.stroke();
    g.textAlign = "right"; g.textBaseline = "middle";
    g.fillText(num(Math.round((max * i) / 4)), left - 6, yy);
  }
  g.textAlign = "center"; g.textBaseline = "top";
  hours.forEach((hour, i) => {
    if (hours.length <= 8 || i % Math.ceil(hours.length / 8) === 0) {
      g.fillText(new Date(hour).toISOString().slice(5, 13).replace("T", " ") + "h", x(i), top + hgt + 6);
    }
  });
  for (const [kind, , color] of KINDS) {
    for (const [which, dash] of [["human", []], ["machine", [4, 4]]]) {
      g.beginPath();
      hours.forEach((hour, i) => (i ? g.lineTo(x(i), y(value(hour, kind, which))) : g.moveTo(x(i), y(value(hour, kind, which)))));
      if (hours.length === 1) g.arc(x(0), y(value(hours[0], kind, which)), 3, 0, 2 * Math.PI);
      g.setLineDash(dash); g.strokeStyle = color; g.lineWidth = 2; g.stroke();
    }
  }
  g.setLineDash([]);
}
