"""One self-contained HTML page for a trace: pipeline swimlanes, summary table, loss curve.

The page works offline from disk: CSS, JavaScript and the data (JSON) are inline, nothing is
fetched. The swimlanes are drawn on one canvas (tens of thousands of spans stay fast); the DOM
keeps stable hooks for tests and scripts:
  .rank-lane[data-rank=r]          one per rank (built by the script), data-spans = compute spans
  .sublane[data-lane=compute|comm] its compute lane and the comm lane(s) under it
  table#summary tr[data-rank]      per-rank numbers; td[data-key][data-value] = trace_summary values
  table#operations                 time, blocked time and bytes per span name
  select#step-select               zooms to one training step; table#steps shows that step
  svg#loss-curve                   loss (polyline.loss) and val_loss (circle.val-loss) per step
  body[data-ready="1"]             set when the script has finished
"""
from __future__ import annotations

import html
import json

from ringpipe.runtime.files import write_text
from ringpipe.tools.trace_export import assign_lanes
from ringpipe.tools.trace_io import COMM_THREAD, COMPUTE_THREAD, Trace, peer_rank
from ringpipe.tools.trace_summary import step_windows, summarize

SUMMARY_COLUMNS = (("compute_pct", "compute %"), ("comm_pct", "comm %"), ("exposed_comm_pct", "exposed comm %"),
                   ("idle_pct", "idle %"), ("overlap_pct", "overlap %"), ("bubble_pct", "bubble %"),
                   ("compute_ms", "compute ms"), ("wall_ms", "wall ms"))


def view_data(trace: Trace) -> dict:
    """Compact arrays for the script: spans per (rank, lane), p2p arrows, step windows.
    A span's peer is its global rank (the trace records the index within the span's group). Span
    start and duration are integer nanoseconds (JSON writes integers several times faster than
    floats; the script turns them into microseconds)."""
    spans, lanes, sends = [], {}, {}
    for rank in trace.ranks:
        counts = {}
        for thread in (COMPUTE_THREAD, COMM_THREAD):
            own = trace.spans(rank, thread)
            indexes = assign_lanes(own)
            counts[thread] = max(indexes, default=0) + 1
            for span, lane in zip(own, indexes):
                a = span.args
                spans.append([rank, thread, lane, span.start_ns, span.duration_ns, span.name,
                              a.get("microbatch"), a.get("step"), a.get("bytes"), a.get("wait_us"),
                              peer_rank(a) if "peer" in a else a.get("ranks"), a.get("stage")])
                if "flow" in a and span.name in ("send", "recv"):
                    sends.setdefault(a["flow"], {})[span.name] = len(spans) - 1
        lanes[rank] = counts
    arrows = [[ends["send"], ends["recv"]] for ends in sends.values() if len(ends) == 2]
    steps = step_windows(trace)
    stages = {rank: sorted({s.args["stage"] for s in trace.spans(rank, COMPUTE_THREAD) if "stage" in s.args},
                           key=str) for rank in trace.ranks}
    return {"ranks": trace.ranks, "stages": {str(r): v for r, v in stages.items()},
            "lanes": {str(r): c for r, c in lanes.items()}, "spans": spans, "arrows": arrows,
            "wall_us": (trace.end_ns - trace.start_ns) / 1000.0,
            "steps": [[step, lo / 1000.0, hi / 1000.0] for step, (lo, hi) in steps.items()]}


def summary_table(summary: dict) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in SUMMARY_COLUMNS)
    rows = []
    for r in summary["ranks"]:
        cells = "".join(f'<td data-key="{key}" data-value="{r[key]!r}">{r[key]:.2f}</td>' for key, _ in SUMMARY_COLUMNS)
        flag = ' class="slowest" data-slowest="1"' if r["slowest"] else ""
        mark = ' <span class="flag">slowest</span>' if r["slowest"] else ""
        rows.append(f'<tr data-rank="{r["rank"]}"{flag}><th>rank {r["rank"]}{mark}</th>{cells}</tr>')
    bubble = summary["bubble"]
    theory = bubble["theoretical_pct"]
    theory_text = "n/a (no schedule.json)" if theory is None else f"{theory:.2f} %"
    schedule = bubble["schedule"] or {}
    causality = summary["causality"]
    return (f'<table id="summary"><thead><tr><th>rank</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            f'<p id="bubble" data-measured="{bubble["measured_pct"]!r}" data-theoretical="{theory!r}">'
            f'pipeline bubble ({bubble["window"]} window, mean over ranks): measured '
            f'<b>{bubble["measured_pct"]:.2f} %</b>, theoretical <b>{theory_text}</b>'
            f'{html.escape(" for " + str(schedule.get("schedule")) + " p=" + str(schedule.get("pp")) + " m=" + str(schedule.get("microbatches"))) if schedule else ""}'
            f'</p><p id="causality" data-violations="{causality["violations"]}">causality: '
            f'{causality["violations"]} of {causality["pairs_checked"]} receives end before their send starts</p>')


def steps_table(summary: dict) -> str:
    rows = []
    for step in summary["steps"]:
        for r in step["ranks"]:
            rows.append(f'<tr data-step="{html.escape(str(step["step"]))}" data-rank="{r["rank"]}"><td>{html.escape(str(step["step"]))}</td>'
                        f'<td>{r["rank"]}</td><td>{step["wall_ms"]:.3f}</td><td data-value="{r["compute_pct"]!r}">'
                        f'{r["compute_pct"]:.1f}</td><td data-value="{r["exposed_comm_pct"]!r}">{r["exposed_comm_pct"]:.1f}'
                        f'</td><td data-value="{r["idle_pct"]!r}">{r["idle_pct"]:.1f}</td></tr>')
    if not rows:
        return '<p id="steps-note">no step args on the compute spans: no per-step breakdown</p>'
    return ('<table id="steps"><thead><tr><th>step</th><th>rank</th><th>step ms</th><th>compute %</th>'
            f'<th>exposed comm %</th><th>idle %</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def operations_table(summary: dict) -> str:
    rows = "".join(f'<tr data-name="{html.escape(op["name"])}"><td>{html.escape(op["name"])}</td><td>{op["thread"]}</td>'
                   f'<td>{op["count"]}</td><td>{op["total_ms"]:.3f}</td><td>{op["mean_us"]:.1f}</td>'
                   f'<td>{op["blocked_ms"]:.3f}</td><td>{op["bytes"]:,}</td></tr>' for op in summary["operations"])
    return ('<table id="operations"><thead><tr><th>operation</th><th>thread</th><th>count</th><th>total ms</th>'
            f'<th>mean us</th><th>blocked ms</th><th>bytes</th></tr></thead><tbody>{rows}</tbody></table>')


def loss_curve_svg(metrics: list, width: int = 640, height: int = 240) -> str:
    """Inline SVG of loss (line) and val_loss (dots) against step."""
    train = [(row["step"], row["loss"]) for row in metrics
             if isinstance(row.get("step"), (int, float)) and isinstance(row.get("loss"), (int, float))]
    val = [(row["step"], row["val_loss"]) for row in metrics
           if isinstance(row.get("step"), (int, float)) and isinstance(row.get("val_loss"), (int, float))]
    if not train and not val:
        return '<p id="loss-note">no metrics.jsonl in this directory: no loss curve</p>'
    points = train + val
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 50, 10, 10, 30

    def xy(step, value):
        return (left + (step - x0) / (x1 - x0) * (width - left - right),
                top + (y1 - value) / (y1 - y0) * (height - top - bottom))

    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(*p) for p in train))
    dots = "".join(f'<circle class="val-loss" cx="{x:.1f}" cy="{y:.1f}" r="3"><title>step {s} val_loss {v:.4f}'
                   f'</title></circle>' for (s, v), (x, y) in ((p, xy(*p)) for p in val))
    ticks = "".join(f'<text x="{left - 4}" y="{xy(x0, v)[1] + 4:.1f}" text-anchor="end">{v:.3g}</text>'
                    for v in (y0, (y0 + y1) / 2, y1))
    ticks += "".join(f'<text x="{xy(s, y0)[0]:.1f}" y="{height - 10}" text-anchor="middle">{s:g}</text>'
                     for s in (x0, (x0 + x1) / 2, x1))
    return (f'<svg id="loss-curve" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" class="frame"/>'
            f'<polyline class="loss" points="{line}"/>{dots}{ticks}'
            f'<text x="{width - right}" y="{top + 12}" text-anchor="end">loss (line), val_loss (dots) vs step</text></svg>')


def render_html(trace: Trace, summary: dict | None = None) -> str:
    summary = summary or summarize(trace)
    data = json.dumps(view_data(trace), separators=(",", ":")).replace("</", "<\\/")
    options = "".join(f'<option value="{html.escape(str(s["step"]))}">step {html.escape(str(s["step"]))}</option>'
                      for s in summary["steps"])
    title = html.escape(f"ringpipe trace: {trace.directory}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{CSS}</style></head>
<body data-ready="0">
<h1>{title}</h1>
<p class="meta">{len(trace.ranks)} ranks, {summary['wall_ms']:.3f} ms traced, clock: {html.escape(trace.clock_source)}.
Wheel: zoom, drag: pan, hover: details. F forward, B backward, W weight gradient, O optimizer; the number is the micro-batch.
Comm lanes: faded part = blocked on a peer. Arrows: send to matching recv. Steps are numbered from 1, as in the
training's progress line and metrics.jsonl.</p>
<div id="controls"><label>step <select id="step-select"><option value="all">all</option>{options}</select></label>
<button id="reset-zoom">reset zoom</button> <span id="range"></span></div>
<div id="legend"></div>
<div id="timeline"><div id="labels"></div><canvas id="canvas"></canvas></div>
<div id="tooltip" hidden></div>
<h2>Summary</h2>{summary_table(summary)}
<p class="meta">compute + exposed comm + idle = 100 % of the traced wall time; idle includes time blocked on a peer;
bubble = idle within the training steps; slowest = most compute time.</p>
<h2>Per step</h2>{steps_table(summary)}
<h2>Operations (all ranks)</h2>{operations_table(summary)}
<h2>Loss</h2>{loss_curve_svg(trace.metrics)}
<script type="application/json" id="trace-data">{data}</script>
<script>{FORMAT_SCRIPT}{SCRIPT}</script>
</body></html>
"""


def write_view(trace: Trace, path: str, summary: dict | None = None) -> None:
    """Write the page; pass the trace's `summarize` result when you have it (saves recomputing)."""
    write_text(path, render_html(trace, summary))


CSS = """
body{font:13px system-ui,sans-serif;margin:12px;color:#222}h1{font-size:16px}h2{font-size:14px;margin-top:18px}
.meta{color:#555}#timeline{display:flex;border:1px solid #ccc;user-select:none}
#labels{width:120px;flex:none;border-right:1px solid #ccc}#canvas{flex:1;height:100px;cursor:grab;display:block}
.rank-lane{box-shadow:inset 0 -1px #ddd}.sublane{box-sizing:border-box;padding-left:4px;
font-size:11px;overflow:hidden;white-space:nowrap}.sublane[data-lane=compute]{font-weight:600}
.sublane[data-lane=comm]{color:#777}#tooltip{position:fixed;background:#fff;border:1px solid #888;padding:4px 6px;
pointer-events:none;font-size:12px;white-space:pre;box-shadow:1px 1px 4px #0003}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
tr.slowest{background:#fde2e1}.flag{color:#c00;font-size:11px}#steps tr[hidden]{display:none}
#loss-curve .frame{fill:none;stroke:#ccc}#loss-curve .loss{fill:none;stroke:#4e79a7;stroke-width:1.5}
#loss-curve .val-loss{fill:#e15759}#loss-curve text{font-size:10px;fill:#555}
#legend{margin:6px 0;font-size:12px}#legend span{margin-right:12px;white-space:nowrap}
#legend i{display:inline-block;width:12px;height:10px;margin-right:4px;vertical-align:-1px}
"""

# Pure functions of the page (the tests run them in Node when it is installed).
FORMAT_SCRIPT = r"""
// One time unit at a time, chosen by the visible range: the axis, the range and the tooltip agree.
const UNITS = [['s', 1e6], ['ms', 1e3], ['us', 1]];
function unitFor(rangeUs) { return UNITS.find(([, size]) => rangeUs >= 10 * size) || UNITS[2]; }
function inUnit(us, unit) { return (us / unit[1]).toFixed(3) + ' ' + unit[0]; }
// The tooltip of one span row of the data: [rank, thread, lane, start_us, duration_us, name,
// microbatch, step, bytes, wait_us, peer's global rank or the collective's ranks, stage].
function describe(s, unit) {
  const given = v => v !== null && v !== undefined;
  const lines = [s[5] + '  (rank ' + s[0] + ', ' + s[1] + ')',
                 'start ' + inUnit(s[3], unit) + ', duration ' + inUnit(s[4], unit)];
  if (given(s[6])) lines.push('micro-batch ' + s[6]);
  if (given(s[11])) lines.push('stage ' + s[11]);
  if (given(s[7])) lines.push('step ' + s[7]);
  if (given(s[8])) lines.push('bytes ' + s[8].toLocaleString('en-US'));
  if (s[9]) lines.push('blocked on a peer ' + inUnit(s[9], unit));
  if (given(s[10])) lines.push((Array.isArray(s[10]) ? 'ranks ' : 'peer rank ') + s[10]);
  return lines.join('\n');
}
"""

SCRIPT = r"""
(function () {
  const D = JSON.parse(document.getElementById('trace-data').textContent);
  for (const s of D.spans) { s[3] /= 1000; s[4] /= 1000; }  // ns -> us, the unit of everything below
  const COMPUTE_H = 26, COMM_H = 12, AXIS_H = 18;
  const COLORS = {forward: '#4e79a7', backward: '#59a14f', backward_input: '#8cd17d', backward_weight: '#b07aa1',
    optimizer: '#9d9d9d', send: '#e15759', recv: '#76b7b2'};
  const LETTERS = {forward: 'F', backward: 'B', backward_input: 'B', backward_weight: 'W', optimizer: 'O'};
  const OTHER = {compute: '#f28e2b', comm: '#edc948'};
  // The legend is built from the same colour table the canvas uses, so they cannot disagree.
  const legend = document.getElementById('legend');
  const present = new Set(D.spans.map(s => s[5]));
  const entries = Object.entries(COLORS).filter(([name]) => present.has(name));
  if (D.spans.some(s => !(s[5] in COLORS) && s[1] === 'compute')) entries.push(['other compute', OTHER.compute]);
  if (D.spans.some(s => !(s[5] in COLORS) && s[1] === 'comm')) entries.push(['other comm (collectives)', OTHER.comm]);
  for (const [name, color] of entries) {
    const item = document.createElement('span'); item.dataset.name = name;
    const swatch = document.createElement('i'); swatch.style.background = color;
    item.append(swatch, name.replace(/_/g, ' ')); legend.appendChild(item);
  }
  if (D.spans.some(s => s[1] === 'comm' && s[9])) {
    const item = document.createElement('span'); item.dataset.name = 'blocked';
    const swatch = document.createElement('i'); swatch.style.background = OTHER.comm; swatch.style.opacity = 0.3;
    item.append(swatch, 'blocked on a peer (faded part of a comm span)'); legend.appendChild(item);
  }

  const canvas = document.getElementById('canvas'), ctx = canvas.getContext('2d');
  const labels = document.getElementById('labels'), tip = document.getElementById('tooltip');
  // Rows: for each rank its compute lane(s), then its comm lane(s).
  const rowY = {}; let y = AXIS_H;
  const spacer = document.createElement('div'); spacer.style.height = AXIS_H + 'px'; labels.appendChild(spacer);
  for (const rank of D.ranks) {
    const counts = D.lanes[rank], lane = document.createElement('div');
    lane.className = 'rank-lane'; lane.dataset.rank = rank;
    lane.dataset.spans = D.spans.filter(s => s[0] === rank && s[1] === 'compute').length;
    for (const [thread, h] of [['compute', COMPUTE_H], ['comm', COMM_H]]) {
      for (let i = 0; i < counts[thread]; i++) {
        rowY[rank + '/' + thread + '/' + i] = y; y += h;
        const sub = document.createElement('div');
        sub.className = 'sublane'; sub.dataset.lane = thread; sub.style.height = h + 'px';
        const stages = D.stages[rank] || [];
        const name = 'rank ' + rank + (stages.length ? ' \u00b7 stage ' + stages.join(',') : '');
        sub.textContent = thread === 'compute' ? (i ? '' : name) : (i ? '' : 'comm');
        if (thread === 'compute' && !i) sub.title = name;
        lane.appendChild(sub);
      }
    }
    labels.appendChild(lane);
  }
  const height = y + 4;
  const rowOf = s => rowY[s[0] + '/' + s[1] + '/' + s[2]];
  const heightOf = s => s[1] === 'compute' ? COMPUTE_H : COMM_H;
  let t0 = 0, t1 = Math.max(D.wall_us, 1), width = 800;
  function resize() {
    width = canvas.clientWidth || 800; const ratio = window.devicePixelRatio || 1;
    canvas.style.height = height + 'px'; canvas.width = width * ratio; canvas.height = height * ratio;
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0); draw();
  }
  const X = t => (t - t0) / (t1 - t0) * width;
  function label(s) {
    const letter = LETTERS[s[5]] || (s[1] === 'compute' ? s[5].slice(0, 1).toUpperCase() : '');
    return s[6] === null || s[6] === undefined ? letter : letter + s[6];
  }
  function draw() {
    ctx.clearRect(0, 0, width, height); ctx.font = '11px sans-serif'; ctx.textBaseline = 'middle';
    D.ranks.forEach((rank, k) => {
      const top = rowY[rank + '/compute/0'], bottom = k + 1 < D.ranks.length ? rowY[D.ranks[k + 1] + '/compute/0'] : height;
      ctx.fillStyle = k % 2 ? '#f6f6f6' : '#fff'; ctx.fillRect(0, top, width, bottom - top);
    });
    drawAxis();
    for (const s of D.spans) {
      const a = X(s[3]), b = X(s[3] + s[4]); if (b < 0 || a > width) continue;
      const top = rowOf(s) + 1, h = heightOf(s) - 2, w = Math.max(b - a, 0.5);
      ctx.fillStyle = COLORS[s[5]] || OTHER[s[1]];
      if (s[1] === 'comm' && s[9]) {  // leading wait_us: blocked on a peer, drawn faded
        const blocked = Math.min(X(s[3] + s[9]) - a, w);
        ctx.globalAlpha = 0.3; ctx.fillRect(a, top, blocked, h); ctx.globalAlpha = 1;
        ctx.fillRect(a + blocked, top, w - blocked, h);
      } else ctx.fillRect(a, top, w, h);
      const text = label(s);
      if (text && w > 8 * text.length) {
        ctx.fillStyle = '#fff'; ctx.fillText(text, Math.max(a, 0) + 2, top + h / 2);
      }
    }
    ctx.strokeStyle = '#333'; ctx.fillStyle = '#333'; ctx.lineWidth = 1;
    for (const [si, ri] of D.arrows) {
      const s = D.spans[si], r = D.spans[ri];
      const x0 = X(s[3]), y0 = rowOf(s) + COMM_H / 2, x1 = X(r[3] + r[4]), y1 = rowOf(r) + COMM_H / 2;
      if (Math.max(x0, x1) < 0 || Math.min(x0, x1) > width) continue;
      ctx.beginPath(); ctx.moveTo(x0, y0); ctx.lineTo(x1, y1); ctx.stroke();
      const angle = Math.atan2(y1 - y0, x1 - x0);
      ctx.beginPath(); ctx.moveTo(x1, y1);
      ctx.lineTo(x1 - 6 * Math.cos(angle - 0.4), y1 - 6 * Math.sin(angle - 0.4));
      ctx.lineTo(x1 - 6 * Math.cos(angle + 0.4), y1 - 6 * Math.sin(angle + 0.4)); ctx.fill();
    }
    const unit = unitFor(t1 - t0);
    document.getElementById('range').textContent = 'showing ' + inUnit(t0, unit) + ' to ' + inUnit(t1, unit);
  }
  function drawAxis() {
    const span = t1 - t0, raw = span / 8, decade = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map(m => m * decade).find(v => v >= raw);
    const unit = unitFor(span), digits = Math.max(0, -Math.floor(Math.log10(step / unit[1])));
    ctx.fillStyle = '#555'; ctx.strokeStyle = '#ddd';
    for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) {
      const x = X(t); ctx.beginPath(); ctx.moveTo(x, AXIS_H - 4); ctx.lineTo(x, height); ctx.stroke();
      ctx.fillText((t / unit[1]).toFixed(digits) + ' ' + unit[0], x + 2, 8);
    }
  }
  canvas.addEventListener('wheel', e => {
    e.preventDefault();
    const at = t0 + e.offsetX / width * (t1 - t0), factor = Math.exp(e.deltaY * 0.002);
    const span = Math.max((t1 - t0) * factor, 0.01);
    t0 = at - (at - t0) / (t1 - t0) * span; t1 = t0 + span; draw();
  }, {passive: false});
  let drag = null;
  canvas.addEventListener('mousedown', e => { drag = {x: e.clientX, t0, t1}; canvas.style.cursor = 'grabbing'; });
  window.addEventListener('mouseup', () => { drag = null; canvas.style.cursor = 'grab'; });
  window.addEventListener('mousemove', e => {
    if (!drag) return;
    const dt = (e.clientX - drag.x) / width * (drag.t1 - drag.t0);
    t0 = drag.t0 - dt; t1 = drag.t1 - dt; draw();
  });
  canvas.addEventListener('mousemove', e => {
    const t = t0 + e.offsetX / width * (t1 - t0), tol = 3 / width * (t1 - t0);
    const hit = D.spans.find(s => e.offsetY >= rowOf(s) && e.offsetY < rowOf(s) + heightOf(s) &&
                                   t >= s[3] - tol && t <= s[3] + s[4] + tol);
    if (!hit || drag) { tip.hidden = true; return; }
    tip.textContent = describe(hit, unitFor(t1 - t0)); tip.hidden = false;
    tip.style.left = (e.clientX + 12) + 'px'; tip.style.top = (e.clientY + 12) + 'px';
  });
  canvas.addEventListener('mouseleave', () => { tip.hidden = true; });
  const select = document.getElementById('step-select');
  function showStep(value) {
    const window_ = D.steps.find(s => String(s[0]) === value);
    if (window_) { const pad = (window_[2] - window_[1]) * 0.02; t0 = window_[1] - pad; t1 = window_[2] + pad; }
    else { t0 = 0; t1 = Math.max(D.wall_us, 1); }
    document.querySelectorAll('#steps tbody tr').forEach(tr => {
      tr.hidden = value !== 'all' && tr.dataset.step !== value;
    });
    draw();
  }
  select.addEventListener('change', () => showStep(select.value));
  document.getElementById('reset-zoom').addEventListener('click', () => { select.value = 'all'; showStep('all'); });
  window.addEventListener('resize', resize);
  resize();
  // A long run drawn whole is a blur: open on its last step, laid out like the schedule
  // (or on the step named in the address, e.g. trace.html#step=3).
  const wanted = (location.hash.match(/step=([^&]+)/) || [])[1];
  const opening = wanted || (D.steps.length > 3 ? String(D.steps[D.steps.length - 1][0]) : null);
  if (opening && D.steps.some(st => String(st[0]) === opening)) { select.value = opening; showStep(opening); }
  document.body.dataset.ready = '1';
})();
"""
