// Messages per second over the send, drawn on a canvas from the progress events received.

/** A rate series fed by progress snapshots: the finished count's change over the time between. */
export class RateChart {
  constructor(canvas) {
    this.canvas = canvas;
    this.points = [];  // [seconds since the first event, messages per second]
    this.last = null;  // {t, done} of the previous snapshot
    this.t0 = null;
    canvas.dataset.points = "0";
    this.draw();
  }

  /** Add one progress snapshot (received now); a rate point needs two snapshots. */
  add(snapshot, now = performance.now() / 1000) {
    const done = snapshot.sent + snapshot.failed + snapshot.skipped + snapshot.unknown;
    if (this.t0 === null) this.t0 = now;
    if (this.last !== null && now > this.last.t && done >= this.last.done) {
      const perSecond = (done - this.last.done) / (now - this.last.t);
      this.points.push([now - this.t0, perSecond]);
      if (this.points.length > 2000) this.points.shift();  // a long send keeps its last hour or so
    }
    this.last = { t: now, done };
    this.canvas.dataset.points = String(this.points.length);
    this.draw();
  }

  draw() {
    const c = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = c.clientWidth || 600;
    const height = c.clientHeight || 200;
    if (c.width !== Math.round(width * ratio)) c.width = Math.round(width * ratio);
    if (c.height !== Math.round(height * ratio)) c.height = Math.round(height * ratio);
    const g = c.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    const left = 56, right = 12, top = 12, bottom = 26;
    const w = width - left - right, hgt = height - top - bottom;
    const pts = this.points;
    const maxT = niceCeil(Math.max(10, pts.length ? pts[pts.length - 1][0] : 0));
    const maxR = niceCeil(Math.max(1, ...pts.map((p) => p[1])));
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#667085";
    g.strokeStyle = "#e3e6eb";
    g.lineWidth = 1;
    for (let i = 0; i <= 5; i++) {
      const y = top + hgt - (hgt * i) / 5;
      g.beginPath(); g.moveTo(left, y + 0.5); g.lineTo(left + w, y + 0.5); g.stroke();
      g.textAlign = "right"; g.textBaseline = "middle";
      g.fillText(`${Math.round((maxR * i) / 5).toLocaleString("en-US")}/s`, left - 6, y);
    }
    g.textAlign = "center"; g.textBaseline = "top";
    for (let i = 0; i <= 5; i++) {
      const x = left + (w * i) / 5;
      g.fillText(`${Math.round((maxT * i) / 5)}s`, x, top + hgt + 6);
    }
    if (!pts.length) {
      g.textAlign = "center"; g.textBaseline = "middle";
      g.fillText("messages per second appear here while the broadcast sends", left + w / 2, top + hgt / 2);
      return;
    }
    const x = (t) => left + (w * t) / maxT;
    const y = (r) => top + hgt - (hgt * r) / maxR;
    g.beginPath();
    g.moveTo(x(pts[0][0]), top + hgt);
    for (const [t, r] of pts) g.lineTo(x(t), y(r));
    g.lineTo(x(pts[pts.length - 1][0]), top + hgt);
    g.closePath();
    g.fillStyle = "rgba(47, 111, 223, 0.12)";
    g.fill();
    g.beginPath();
    pts.forEach(([t, r], i) => (i ? g.lineTo(x(t), y(r)) : g.moveTo(x(t), y(r))));
    g.strokeStyle = "#2f6fdf";
    g.lineWidth = 2;
    g.stroke();
  }
}

function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
