"""A self-contained HTML page that replays a decode step by step (`loopdlm sample --html FILE`).

The page's data is one JSON document (`trace_document` / `continuation_document`), embedded in a
`<script type="application/json">` tag and replayed by plain inline JavaScript; no network, scripts or fonts from
elsewhere. The same document is what `sample --trace FILE` writes. Format "loopdlm-denoising-trace/1":

    mask_id: the mask token id;  pieces: {"id": display text} for every id that appears;
    rows: each row's canvas before the first step, ids with null for left padding (never shown);
    steps: one object per denoising step, in decode order:
        block: index of the window being decoded (a semi-AR block or a block-diffusion block), window: [start, stop)
        loops: S of the forward pass the step read; forward_pass: false when the previous pass was reused;
        append: mask columns added at the end of every row still generating before this step (a new
            block-diffusion block; 0 otherwise);
        rows: per row null (the row stopped generating earlier) or {"commit": [[column, id, confidence], ...],
            "remask": [column, ...], "core": core applications run for the row in this step};
    meta: free-form description (checkpoint, sampler settings, statistics, prompts, samples, stop reasons).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from loopdlm.errors import UserError
from loopdlm.sampling.engine import DecodeTrace
from loopdlm.sampling.long_generation import BlockTrace, Continuations

FORMAT = "loopdlm-denoising-trace/1"
_DATA_TAG = re.compile(r'<script type="application/json" id="trace-data">(.*?)</script>', re.DOTALL)


class PieceTokenizer(Protocol):
    """What the document needs from a tokenizer: the mask id and the text of single ids."""

    mask_id: int

    def decode(self, ids: list[int], skip_special: bool = True) -> str: ...


def trace_document(trace: DecodeTrace, tokenizer: PieceTokenizer, hidden: Tensor | None = None,
                   meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The page document of one `generate` decode (every sampler, semi-AR blocks, CoDD).

    hidden: bool [B, L], columns never shown (the left padding of prompts); None shows every column.
    """
    return _document([BlockTrace(list(range(trace.initial.shape[0])), trace)], hidden, tokenizer, meta)


def continuation_document(continuations: Continuations, tokenizer: PieceTokenizer,
                          meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The page document of `Decoder.continue_prompts(..., record_trace=True)`: a canvas decode, or a
    block-diffusion generation whose blocks appear one after another and whose stopped rows leave the later steps.
    The prompts' left padding is never shown."""
    if not continuations.traces:
        raise UserError("no decode traces to show (decode with record_trace=True)")
    return _document(continuations.traces, continuations.prompt_padding, tokenizer, meta)


def _document(blocks: list[BlockTrace], hidden: Tensor | None, tokenizer: PieceTokenizer,
              meta: dict[str, Any] | None) -> dict[str, Any]:
    first = blocks[0].trace.initial
    rows: list[list[int | None]] = first.tolist()
    if hidden is not None:
        for row, flags in zip(rows, hidden.tolist()):
            for column, is_hidden in enumerate(flags):
                if is_hidden:
                    row[column] = None
    used = {token for row in rows for token in row if token is not None}
    steps: list[dict[str, Any]] = []
    block, last_window, width = -1, None, first.shape[1]
    for block_trace in blocks:
        append = block_trace.trace.initial.shape[1] - width
        width = block_trace.trace.initial.shape[1]
        for step in block_trace.trace.steps:
            if step.window != last_window:
                block, last_window = block + 1, step.window
            entries: list[dict[str, Any] | None] = [None] * len(rows)
            for local, row in enumerate(block_trace.rows):
                columns = step.committed[local].nonzero().flatten().tolist()
                commits = [[column, int(step.tokens[local, column]), float(step.confidence[local, column])]
                           for column in columns]
                used.update(token for _, token, _ in commits)
                entries[row] = {"commit": commits, "remask": step.remasked[local].nonzero().flatten().tolist(),
                                "core": float(step.core_applications[local])}
            steps.append({"block": block, "window": [step.window.start, step.window.stop], "loops": step.loops,
                          "forward_pass": step.forward_pass, "append": append, "rows": entries})
            append = 0
    pieces = {str(token): tokenizer.decode([token], skip_special=False) for token in sorted(used)}
    return {"format": FORMAT, "mask_id": tokenizer.mask_id, "pieces": pieces, "rows": rows, "steps": steps,
            "meta": meta or {}}


def viewer_html(document: dict[str, Any]) -> str:
    """One self-contained HTML page replaying `document` (slider, step buttons, play, keyboard arrows)."""
    # '<' escaped keeps any token text (e.g. "</script>") from closing the data tag; JSON.parse reads it back.
    data = json.dumps(document, ensure_ascii=False).replace("<", "\\u003c")
    title = str(document.get("meta", {}).get("title", "loopdlm denoising viewer"))
    return (_PAGE.replace("__TITLE__", _escape_html(title)).replace("__STYLE__", _STYLE)
            .replace("__SCRIPT__", _SCRIPT).replace("__DATA__", data))


def write_viewer(path: str | Path, document: dict[str, Any]) -> None:
    """Write the page of `document` to `path`; UserError (one line) when the folder is missing or unwritable."""
    _write_side_file(path, viewer_html(document))


def write_json(path: str | Path, document: dict[str, Any]) -> None:
    """Write `document` as JSON to `path`; UserError (one line) when the folder is missing or unwritable."""
    _write_side_file(path, json.dumps(document))


def embedded_document(html: str) -> dict[str, Any]:
    """The JSON document embedded in a page written by `viewer_html` (ValueError when there is none)."""
    match = _DATA_TAG.search(html)
    if match is None:
        raise ValueError("no embedded trace data in this page")
    return json.loads(match.group(1))


def _write_side_file(path: str | Path, text: str) -> None:
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}") from None


def _escape_html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__STYLE__</style>
</head>
<body>
<header>
  <h1>__TITLE__</h1>
  <div id="meta"></div>
</header>
<section id="controls">
  <button id="first" title="first step (Home)">|&#x25C0;</button>
  <button id="prev" title="previous step (&#x2190;)">&#x25C0;</button>
  <button id="play" title="play / pause (space)">play</button>
  <button id="next" title="next step (&#x2192;)">&#x25B6;</button>
  <button id="last" title="last step (End)">&#x25B6;|</button>
  <input id="slider" type="range" min="0" value="0" aria-label="step">
  <span id="counter"></span>
  <label>colour <select id="colour">
    <option value="both">step + confidence</option><option value="step">step</option>
    <option value="confidence">confidence</option></select></label>
</section>
<section id="info"></section>
<section id="timeline" title="tokens committed (up) and re-masked (down) per step; click to jump"></section>
<section id="legend"></section>
<main id="rows"></main>
<script type="application/json" id="trace-data">__DATA__</script>
<script>__SCRIPT__</script>
</body>
</html>
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 16px 20px; color: #1d2430; background: #fbfbfd; }
h1 { font-size: 18px; margin: 0 0 4px; }
#meta { font-size: 12px; color: #555; margin-bottom: 10px; }
#controls { display: flex; align-items: center; gap: 6px; flex-wrap: wrap; }
#controls button { font-size: 14px; min-width: 34px; padding: 3px 6px; }
#slider { flex: 1; min-width: 200px; }
#counter { font-variant-numeric: tabular-nums; font-size: 13px; min-width: 120px; }
#info { font-size: 13px; margin: 8px 0 6px; min-height: 18px; }
#info b { font-weight: 600; }
#timeline { display: flex; align-items: center; height: 56px; gap: 1px; margin: 4px 0 8px; cursor: pointer;
  border-top: 1px solid #e3e5ea; border-bottom: 1px solid #e3e5ea; }
.tick { flex: 1; position: relative; height: 100%; min-width: 1px; }
.tick .up { position: absolute; bottom: 50%; left: 0; right: 0; background: #6c8ebf; }
.tick .down { position: absolute; top: 50%; left: 0; right: 0; background: #d9534f; }
.tick.block-start { border-left: 1px solid #aab; }
.tick.current { background: #ffe9a8; }
#legend { font-size: 12px; color: #444; display: flex; gap: 14px; flex-wrap: wrap; align-items: center;
  margin-bottom: 10px; }
.swatch { display: inline-block; width: 120px; height: 10px; vertical-align: middle; border: 1px solid #ccc; }
.row { margin: 10px 0 14px; }
.row-head { font-size: 12px; color: #444; margin-bottom: 3px; }
.row-head .stopped { color: #a33; }
.cells { display: flex; flex-wrap: wrap; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 15px;
  line-height: 22px; }
.cell { min-width: 10px; padding: 0 1px; margin: 0 1px 2px 0; border: 1px solid transparent; border-radius: 3px;
  white-space: pre; text-align: center; }
.cell.fixed { color: #555; background: #eceef2; }
.cell.mask { color: #9aa1ad; background: #f1f2f5; }
.cell.now { border-color: #111; box-shadow: 0 0 0 1px #111; }
.cell.remasked-now { border: 1px dashed #d9534f; color: #d9534f; background: #fdecea; }
.cell.was-remasked { border-bottom: 2px solid #d9534f; }
.cell.special { font-size: 10px; color: #666; }
.cell.space { color: #a0a6b2; }
"""

_SCRIPT = r"""
"use strict";
const data = JSON.parse(document.getElementById("trace-data").textContent);
const steps = data.steps, total = steps.length, MASK = data.mask_id;
const $ = (id) => document.getElementById(id);
const slider = $("slider");
slider.max = String(total);
let current = 0, timer = null;

function piece(id) {
  const text = data.pieces[String(id)];
  if (text === undefined) return "?";
  return text.replace(/ /g, "\u00b7").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
}

function describeMeta() {
  const m = data.meta || {}, parts = [];
  for (const key of ["checkpoint", "sampler_summary", "stats_summary"]) if (m[key]) parts.push(m[key]);
  $("meta").textContent = parts.join("  |  ");
}

// Canvas state of every row after `upto` steps.
function replay(upto) {
  const rows = data.rows.map((row) => ({
    tokens: row.slice(), step: row.map(() => null), conf: row.map(() => null), remasks: row.map(() => 0),
    fixed: row.map((t) => t !== null && t !== MASK), remaskedNow: new Set(), committedNow: new Set(),
    core: null, active: true }));
  for (let s = 0; s < upto; s++) {
    const step = steps[s], last = s === upto - 1;
    step.rows.forEach((entry, r) => {
      const row = rows[r];
      row.active = entry !== null;
      if (entry === null) return;
      for (let k = 0; k < step.append; k++) {
        row.tokens.push(MASK); row.step.push(null); row.conf.push(null); row.remasks.push(0); row.fixed.push(false);
      }
      for (const [column, id, conf] of entry.commit) {
        row.tokens[column] = id; row.step[column] = s + 1; row.conf[column] = conf;
        if (last) row.committedNow.add(column);
      }
      for (const column of entry.remask) {
        row.tokens[column] = MASK; row.step[column] = null; row.conf[column] = null; row.remasks[column] += 1;
        if (last) row.remaskedNow.add(column);
      }
      if (last) row.core = entry.core;
    });
  }
  return rows;
}

function colour(step, conf) {
  const mode = $("colour").value;
  const hue = total > 1 ? 230 - 230 * (step - 1) / (total - 1) : 230;
  if (mode === "step") return `hsl(${hue}, 70%, 78%)`;
  if (mode === "confidence") return `hsl(130, 55%, ${Math.round(96 - 46 * conf)}%)`;
  return `hsla(${hue}, 75%, 55%, ${(0.12 + 0.78 * conf).toFixed(3)})`;
}

function renderRows(rows) {
  const container = $("rows");
  container.textContent = "";
  const meta = data.meta || {};
  rows.forEach((row, r) => {
    const div = document.createElement("div");
    div.className = "row";
    const head = document.createElement("div");
    head.className = "row-head";
    let label = `row ${r}`;
    if (meta.prompts && meta.prompts[r] !== undefined) label += ` \u2014 prompt ${JSON.stringify(meta.prompts[r])}`;
    if (row.core !== null && current > 0) label += ` \u2014 core applications this step: ${row.core}`;
    head.textContent = label;
    if (!row.active && current > 0) {
      const stopped = document.createElement("span");
      stopped.className = "stopped";
      const reason = meta.stop_reasons ? meta.stop_reasons[r] : "done";
      stopped.textContent = ` \u2014 stopped (${reason})`;
      head.appendChild(stopped);
    }
    div.appendChild(head);
    const cells = document.createElement("div");
    cells.className = "cells";
    row.tokens.forEach((id, column) => {
      if (id === null) return;
      const cell = document.createElement("span");
      cell.className = "cell";
      let tip = `column ${column}`;
      if (id === MASK) {
        cell.classList.add("mask");
        cell.textContent = "\u2592";
        if (row.remaskedNow.has(column)) { cell.classList.add("remasked-now"); cell.textContent = "\u21ba"; }
        tip += " \u00b7 masked";
      } else {
        const text = piece(id);
        cell.textContent = text;
        if (/^<\|.*\|>$/.test(text)) cell.classList.add("special");
        if (/^\s+$/.test(data.pieces[String(id)])) cell.classList.add("space");
        tip += ` \u00b7 id ${id} ${JSON.stringify(text)}`;
        if (row.fixed[column]) { cell.classList.add("fixed"); tip += " \u00b7 given"; }
        else {
          cell.style.background = colour(row.step[column], row.conf[column]);
          tip += ` \u00b7 committed at step ${row.step[column]} \u00b7 confidence ${row.conf[column].toFixed(3)}`;
        }
        if (row.committedNow.has(column)) cell.classList.add("now");
      }
      if (row.remasks[column] > 0) {
        cell.classList.add("was-remasked");
        tip += ` \u00b7 re-masked ${row.remasks[column]}\u00d7`;
      }
      cell.title = tip;
      cells.appendChild(cell);
    });
    div.appendChild(cells);
    container.appendChild(div);
  });
}

function renderInfo() {
  $("counter").textContent = `step ${current} / ${total}`;
  if (current === 0) { $("info").textContent = "initial canvas: prompts and masked slots"; return; }
  const step = steps[current - 1];
  let commits = 0, remasks = 0, core = 0, active = 0;
  for (const entry of step.rows) {
    if (entry === null) continue;
    active += 1; commits += entry.commit.length; remasks += entry.remask.length; core += entry.core;
  }
  $("info").innerHTML = "";
  const add = (label, value) => {
    const b = document.createElement("b"); b.textContent = label;
    $("info").append(b, ` ${value}   `);
  };
  add("block", `${step.block} (columns ${step.window[0]}\u2013${step.window[1] - 1})`);
  add("loops S", step.loops);
  add("forward pass", step.forward_pass ? "run" : "reused (canvas unchanged)");
  add("core applications", `${core} (${active} rows)`);
  add("committed", commits);
  add("re-masked", remasks);
  if (step.append) add("new block", `${step.append} columns`);
}

function buildTimeline() {
  let most = 1;
  const counts = steps.map((step) => {
    let c = 0, m = 0;
    for (const e of step.rows) if (e) { c += e.commit.length; m += e.remask.length; }
    most = Math.max(most, c, m);
    return [c, m];
  });
  const line = $("timeline");
  counts.forEach(([c, m], s) => {
    const tick = document.createElement("div");
    tick.className = "tick";
    if (s === 0 || steps[s].block !== steps[s - 1].block) tick.classList.add("block-start");
    const up = document.createElement("div"); up.className = "up"; up.style.height = `${48 * c / most}%`;
    const down = document.createElement("div"); down.className = "down"; down.style.height = `${48 * m / most}%`;
    tick.append(up, down);
    tick.title = `step ${s + 1}: ${c} committed, ${m} re-masked, S=${steps[s].loops}`;
    tick.addEventListener("click", () => go(s + 1));
    line.appendChild(tick);
  });
}

function buildLegend() {
  const legend = $("legend");
  const stepColours = Array.from({ length: 7 }, (_, i) => `hsl(${230 - 230 * i / 6}, 75%, 60%)`).join(", ");
  const confidence = "hsla(200, 75%, 55%, 0.12), hsla(200, 75%, 55%, 0.9)";
  legend.innerHTML = "";
  const item = (html) => {
    const span = document.createElement("span");
    span.innerHTML = html;
    legend.appendChild(span);
  };
  const swatch = (colours) => `<span class="swatch" style="background: linear-gradient(to right, ${colours})"></span>`;
  item(`commit step: early ${swatch(stepColours)} late`);
  item(`confidence: low ${swatch(confidence)} high`);
  item(`<span class="cell mask">\u2592</span> masked`);
  item(`<span class="cell remasked-now">\u21ba</span> re-masked this step`);
  item(`<span class="cell was-remasked">x</span> re-masked earlier`);
  item(`<span class="cell now">x</span> committed this step`);
  item(`<span class="cell fixed">x</span> given`);
}

function go(step) {
  current = Math.max(0, Math.min(total, step));
  slider.value = String(current);
  renderInfo();
  renderRows(replay(current));
  document.querySelectorAll(".tick").forEach((t, s) => t.classList.toggle("current", s === current - 1));
}

function togglePlay() {
  if (timer !== null) { clearInterval(timer); timer = null; $("play").textContent = "play"; return; }
  if (current >= total) go(0);
  $("play").textContent = "pause";
  timer = setInterval(() => { if (current >= total) togglePlay(); else go(current + 1); }, 350);
}

$("first").addEventListener("click", () => go(0));
$("prev").addEventListener("click", () => go(current - 1));
$("next").addEventListener("click", () => go(current + 1));
$("last").addEventListener("click", () => go(total));
$("play").addEventListener("click", togglePlay);
$("colour").addEventListener("change", () => go(current));
slider.addEventListener("input", () => go(Number(slider.value)));
document.addEventListener("keydown", (event) => {
  if (event.target.tagName === "SELECT") return;
  if (event.key === "ArrowRight") go(current + 1);
  else if (event.key === "ArrowLeft") go(current - 1);
  else if (event.key === "Home") go(0);
  else if (event.key === "End") go(total);
  else if (event.key === " ") { event.preventDefault(); togglePlay(); }
});
describeMeta();
buildTimeline();
buildLegend();
const start = new URLSearchParams(location.search).get("step");
go(start === null ? total : Number(start));
"""
