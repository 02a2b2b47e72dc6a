// The views both pages draw: explain.html (one forward pass, its numbers inline) and
// explore.html (the live page `python -m minislm explore` serves). Each function takes
// the numbers the runtime computed and draws them; every legend and every claim in a
// caption is computed here from those numbers, never written in advance (a page with
// the causal mask removed must not say "the future is hidden").
"use strict";

const MASKED = [230, 230, 230];  // the grey of a probability that is exactly 0
const SELECTED = "#c9a400";
const ID_PIECE = /^<id (\d+)>$/;  // tokenizer.token_piece of an id with no piece

function blue(x) {  // x in [0, 1]: white at 0, dark blue at 1
  const p = Math.min(Math.max(x, 0), 1);
  return [Math.round(255 - p * 247), Math.round(255 - p * 207), Math.round(255 - p * 148)];
}
const css = rgb => `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
};
const fmt = (x, digits = 4) => (x === null || x === undefined ? "-" : Number(x).toFixed(digits));

// ---- attention maps: base64 of uint16 little-endian fixed point; 0 means exactly 0,
// v > 0 means (v - 1) / (fixed_point - 1). layout "lower": row q holds keys 0..q (the
// page was told every key after its query is exactly 0); "full": every key of every row.
function decodeMap(b64, T, layout, fixedPoint) {
  const bytes = atob(b64);
  const map = new Float32Array(T * T).fill(-1);  // -1: exactly 0
  let k = 0;
  for (let q = 0; q < T; q++) {
    const last = layout === "full" ? T - 1 : q;
    for (let s = 0; s <= last; s++, k++) {
      const v = bytes.charCodeAt(2 * k) | (bytes.charCodeAt(2 * k + 1) << 8);
      map[q * T + s] = v === 0 ? -1 : (v - 1) / (fixedPoint - 1);
    }
  }
  return map;
}

function mapFacts(map, T) {
  // What the legend says, counted from the map itself.
  let max = 0, zeroAfter = 0, zeroBefore = 0, readAfter = 0;
  for (let q = 0; q < T; q++) {
    for (let s = 0; s < T; s++) {
      const p = map[q * T + s];
      if (p > max) max = p;
      if (p < 0 && s > q) zeroAfter++;
      if (p < 0 && s <= q) zeroBefore++;
      if (p >= 0 && s > q) readAfter++;
    }
  }
  return {max, zeroAfter, zeroBefore, readAfter};
}

function labelEvery(cell) {  // label every k-th position, so that labels stay >= 14 px apart
  for (const k of [1, 2, 5, 10, 20, 50, 100]) if (k * cell >= 14) return k;
  return 200;
}

function drawMap(canvas, map, T, options) {
  // options: cell (px), labels (pieces, or null for none), scale (the value drawn darkest),
  // row (a query to outline, or -1).
  const {cell, labels, scale, row} = options;
  const ctx = canvas.getContext("2d");
  const pieces = labels && cell >= 10;
  ctx.font = Math.min(12, Math.max(cell - 1, 9)) + "px monospace";
  let margin = 0;
  if (labels) {
    const widest = pieces ? Math.max(...labels.map(l => ctx.measureText(l).width)) : ctx.measureText(String(T)).width;
    margin = Math.ceil(Math.min(widest, 240)) + 8;
  }
  canvas.width = margin + T * cell + 2;
  canvas.height = margin + T * cell + 2;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let q = 0; q < T; q++) {
    for (let s = 0; s < T; s++) {
      const p = map[q * T + s];
      ctx.fillStyle = css(p < 0 ? MASKED : blue(scale > 0 ? p / scale : 0));
      ctx.fillRect(margin + s * cell, margin + q * cell, cell, cell);
    }
  }
  const every = pieces ? 1 : labelEvery(cell);
  const shown = [];
  if (labels) {
    ctx.font = Math.min(12, Math.max(cell - 1, 9)) + "px monospace";
    ctx.fillStyle = "#222";
    ctx.textBaseline = "middle";
    for (let t = 0; t < T; t += every) {
      const text = pieces ? labels[t] : String(t);
      shown.push(t);
      ctx.textAlign = "right";
      ctx.fillText(text, margin - 4, margin + (t + 0.5) * cell);
      ctx.save();
      ctx.translate(margin + (t + 0.5) * cell, margin - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left";
      ctx.fillText(text, 0, 0);
      ctx.restore();
    }
  }
  if (row >= 0 && row < T) {
    ctx.strokeStyle = SELECTED;
    ctx.lineWidth = 2;
    ctx.strokeRect(margin - 1, margin + row * cell - 1, T * cell + 2, cell + 2);
  }
  canvas.dataset.labels = pieces ? "pieces" : labels ? "positions" : "none";
  canvas.dataset.labelled = JSON.stringify(shown);
  canvas.dataset.highlightRow = row;
  return margin;
}

function colourBar(box, scale, caption) {
  // A legend: the colour of 0, of `scale` (the darkest value drawn) and between, with
  // the grey of an exact 0 beside it.
  box.textContent = "";
  const c = el("canvas", {width: 160, height: 12});
  const ctx = c.getContext("2d");
  for (let x = 0; x < 160; x++) {
    ctx.fillStyle = css(blue(x / 159));
    ctx.fillRect(x, 0, 1, 12);
  }
  const grey = el("span", {className: "swatch"});
  grey.style.background = css(MASKED);
  box.append(el("span", {className: "tick"}, "0"), c, el("span", {className: "tick"}, fmt(scale, 4)),
             el("span", {className: "legend-caption"}, caption));
  box.dataset.scale = scale;
  return grey;
}

function attentionLegend(box, map, T, rowSums, window) {
  // The colour bar and the sentences under it, from this map's numbers.
  const f = mapFacts(map, T);
  const bar = colourBar(box, f.max, " colour: the probability, darkest = the largest in this map");
  const lines = [];
  lines.push(`Each row is one softmax: its probabilities add up to ${fmt(rowSums[0])}` +
             (Math.abs(rowSums[1] - rowSums[0]) > 5e-5 ? ` to ${fmt(rowSums[1])}` : "") + " here.");
  const grey = [];
  if (f.zeroAfter) grey.push(`${f.zeroAfter} right of the diagonal (keys after their query)`);
  if (f.zeroBefore) grey.push(`${f.zeroBefore} at or left of it` + (window ? ` (the sliding window is ${window})` : ""));
  lines.push(grey.length ? `Grey: probability exactly 0, ${grey.join(" and ")}.` : "No probability in this map is exactly 0.");
  if (f.readAfter) lines.push(`${f.readAfter} cells right of the diagonal are not 0: queries read keys that come after them.`);
  const text = el("div", {className: "legend-text"});
  text.append(bar, " ", lines.join(" "));
  box.append(text);
  Object.assign(box.dataset, {zeroAfter: f.zeroAfter, zeroBefore: f.zeroBefore, readAfter: f.readAfter});
  return f;
}

function describeCell(map, T, q, s, pieces, window) {
  const p = map[q * T + s];
  const who = `query ${q} ${JSON.stringify(pieces[q])} -> key ${s} ${JSON.stringify(pieces[s])}`;
  if (p >= 0) return `${who}: ${p.toFixed(4)}` + (s > q ? " (a key after its query)" : "");
  const why = s > q ? "it comes later" : window && s <= q - window ? `it is outside the sliding window of ${window}`
    : "the softmax underflowed";
  return `${who}: exactly 0; ${why}`;
}

// ---- tokens, and ids the tokenizer has no piece for

function idNote(box, vocab, piecesSeen) {
  // Shown only when an <id N> appears somewhere on the page; the numbers are the model's.
  const ids = [...new Set(piecesSeen.filter(p => ID_PIECE.test(p)))];
  box.hidden = ids.length === 0;
  box.textContent = ids.length === 0 ? "" :
    `${ids.slice(0, 4).join(", ")}${ids.length > 4 ? ", ..." : ""}: an id the model's embedding and output layer have ` +
    `(they have ${vocab.embedding} rows) but the tokenizer has no piece for (it knows ids 0..${vocab.tokenizer - 1}): ` +
    `the vocabulary is padded. Such an id still has an output row, so the lens and the next-token list can ` +
    `rank it; it can never be typed, and the sampler never picks one (runtime.allowed_ids).`;
  box.dataset.ids = JSON.stringify(ids);
}

function tokenChip(t, i, selected, onPick) {
  const span = el("span", {className: "tok" + (selected ? " selected" : "") + (t.generated ? " gen" : "") +
                            (ID_PIECE.test(t.piece) ? " noid" : "")});
  span.append(t.piece + " ", el("small", {}, `${i}:${t.id}`));
  if (ID_PIECE.test(t.piece)) span.title = "an id the tokenizer has no piece for (see the note)";
  span.dataset.pos = i;
  span.onclick = () => onPick(i);
  return span;
}

function tokenList(box, tokens, pos, onPick) {
  box.textContent = "";
  const T = tokens.length;
  tokens.forEach((t, i) => {
    if (t.id < 0) {  // an image's placeholders (Phi-3-vision): one box for the whole run
      if (i > 0 && tokens[i - 1].id === t.id) return;
      let last = i;
      while (last + 1 < T && tokens[last + 1].id === t.id) last++;
      const span = el("span", {className: "tok img" + (pos >= i && pos <= last ? " selected" : "")});
      span.dataset.first = i;
      span.dataset.last = last;
      span.append(`${t.piece} \u00d7${last - i + 1} `, el("small", {}, `${i}-${last}`));
      span.onclick = () => onPick(last);
      box.append(span);
      return;
    }
    box.append(tokenChip(t, i, i === pos, onPick));
  });
}

// ---- the logit lens, with its measures

const LENS_MEASURES = {
  top: {name: "the top token", title: "top token and its probability", value: (lens, r, t) => lens.top_probs[r][t], digits: 2},
  entropy: {name: "entropy", title: "entropy of the distribution (nats)", value: (lens, r, t) => lens.entropy[r][t], digits: 2},
  kl: {name: "KL to the final distribution", title: "KL(final || this row), nats: what this row still lacks of the model's answer",
       value: (lens, r, t) => lens.kl_to_final[r][t], digits: 2},
  rank: {name: "rank of the next token", title: "rank of the token that really comes next (1 = top)",
         value: (lens, r, t) => (t < lens.next_ranks[r].length ? lens.next_ranks[r][t] : null), digits: 0},
};

function lensSection(box, onMeasure) {
  // The lens's controls, legend, table and note (ids: measure, lens-legend, lens, lens-note).
  const select = el("select", {id: "measure"});
  for (const [key, m] of Object.entries(LENS_MEASURES)) select.append(new Option(m.name, key));
  select.onchange = () => onMeasure(select.value);
  box.append(el("div", {className: "controls"}, el("label", {}, "cells show ", select)),
             el("div", {id: "lens-legend", className: "legend"}),
             el("div", {className: "scroll"}, el("table", {id: "lens"})), el("p", {id: "lens-note", className: "note"}));
}

function lensScale(lens, measure) {
  // The darkest value of the colour bar: 1 for probabilities, else the largest value shown.
  if (measure === "top") return 1;
  let max = 0;
  lens.rows.forEach((_, r) => lens.top_probs[r].forEach((_, t) => {
    const v = LENS_MEASURES[measure].value(lens, r, t);
    if (v !== null && v > max) max = v;
  }));
  return max;
}

function lensTable(table, legend, lens, pieces, state, onPick) {
  // Rows: the embedding, then each layer; columns: positions. state: pos, layer, measure.
  const T = pieces.length, m = LENS_MEASURES[state.measure];
  const scale = lensScale(lens, state.measure);
  colourBar(legend, scale, ` colour: ${m.title}` + (state.measure === "rank" ? " (darker = worse)" : ""));
  table.textContent = "";
  const head = (label, cells) => {
    const tr = table.insertRow();
    tr.append(el("th", {}, label));
    cells.forEach((text, t) => tr.append(el("th", {className: t === state.pos ? "sel" : ""}, String(text))));
  };
  head("position", pieces.map((_, t) => t));
  head("input", pieces);
  head("next", pieces.map((_, t) => (t + 1 < T ? pieces[t + 1] : "?")));
  lens.rows.forEach((name, r) => {
    const tr = table.insertRow();
    tr.className = name === `layer ${state.layer}` ? "sel" : "";
    tr.dataset.row = name;
    tr.append(el("th", {}, name));
    for (let t = 0; t < T; t++) {
      const v = m.value(lens, r, t);
      const td = tr.insertCell();
      td.textContent = state.measure === "top" ? `${lens.top_pieces[r][t]} ${fmt(v, 2)}` : v === null ? "-" : fmt(v, m.digits);
      const hit = t + 1 < T && lens.next_ranks[r][t] === 1;
      td.className = "cell" + (hit ? " hit" : "") + (t === state.pos ? " sel" : "");
      const shade = v === null || scale <= 0 ? 0 : v / scale;
      td.style.background = css(blue(shade));
      td.style.color = shade > 0.55 ? "#fff" : "#111";
      td.title = `${lens.top_pieces[r][t]} ${fmt(lens.top_probs[r][t])}; entropy ${fmt(lens.entropy[r][t], 3)} nats; ` +
        `KL to the final ${fmt(lens.kl_to_final[r][t], 3)} nats` +
        (t + 1 < T && lens.next_ranks[r][t] > 0 ? `; the next token ${JSON.stringify(pieces[t + 1])} ranks #${lens.next_ranks[r][t]}` : "");
      td.onclick = () => onPick(t);
    }
  });
}

function lensNote(box, lens, tokens, tied) {
  // What the lens is known to get wrong, and what its first row does here, counted.
  const own = tokens.filter((t, i) => t.id >= 0 && lens.top_ids[0][i] === t.id).length;
  const n = tokens.filter(t => t.id >= 0).length;
  box.textContent =
    "The lens reads every layer's stream through the final norm and lm_head, which were trained on the last " +
    "layer's stream only; earlier streams are in other directions, so their readings are rough and can mislead " +
    "(a tuned lens learns a translation per layer instead). " +
    (tied ? "This model ties lm_head to the embedding: the embed row scores each id by the dot product of its " +
            "embedding with the input's own, and a vector is most alike itself, so that row 'predicts' its input. "
          : "This model's lm_head is its own matrix, not the embedding's transpose, so the embed row shows what " +
            "lm_head makes of a raw embedding. ") +
    `Here the embed row's top token is the input itself at ${own} of ${n} positions.`;
  box.dataset.ownInput = own;
}

// ---- next token, steps, routing, images

function nextBars(box, candidates) {
  box.textContent = "";
  for (const c of candidates) {
    const fill = el("span", {className: "fill"});
    fill.style.width = Math.max(1, Math.round(c.p * 260)) + "px";
    box.append(el("div", {className: "bar"}, el("span", {className: "label"}, `${c.piece} (${c.id})`), fill, c.p.toFixed(4)));
  }
}

function stepsTable(table, steps, layer) {
  // Integer steps (PhiMoE's expert ids) are labels, not quantities: no mean or std.
  table.textContent = "";
  const tr = table.insertRow();
  for (const h of ["step", "layer", "shape", "dtype", "mean", "std", "min", "max"]) tr.append(el("th", {}, h));
  for (const s of steps) {
    if (s.layer !== null && s.layer !== layer) continue;
    const row = table.insertRow();
    row.dataset.step = s.name;
    const cells = [s.name, s.layer === null ? "-" : s.layer, "(" + s.shape.join(", ") + ")", s.dtype,
                   s.mean, s.std, s.min, s.max];
    cells.forEach((v, i) => {
      const td = row.insertCell();
      td.textContent = i < 4 ? v : v === null ? "-" : Number(v).toPrecision(4);
      if (i >= 4) td.className = "num";
      if (i >= 4 && v === null) td.title = "ids are labels: their mean and spread mean nothing";
    });
  }
}

function expertColour(e, n) {
  return `hsl(${Math.round(360 * e / n)}, 70%, 82%)`;
}

function routingTable(table, legend, routing, pieces, layer) {
  table.textContent = "";
  const tr = table.insertRow();
  tr.append(el("th", {}, "layer"));
  pieces.forEach(p => tr.append(el("th", {}, p)));
  const counts = new Array(routing.num_experts).fill(0);
  routing.experts.forEach((perToken, l) => {
    const row = table.insertRow();
    row.className = l === layer ? "sel" : "";
    row.append(el("th", {}, String(l)));
    perToken.forEach((pair, t) => {
      counts[pair[0]]++;
      const td = row.insertCell();
      td.textContent = `${pair[0]}/${pair[1]}`;
      const w = routing.weights[l][t];
      td.title = `expert ${pair[0]} weight ${w[0]}, expert ${pair[1]} weight ${w[1]}`;
      td.style.background = expertColour(pair[0], routing.num_experts);
    });
  });
  legend.textContent = "colour = the first choice: ";
  counts.forEach((n, e) => {
    if (!n) return;
    const swatch = el("span", {className: "swatch"});
    swatch.style.background = expertColour(e, routing.num_experts);
    legend.append(el("span", {className: "key"}, swatch, ` expert ${e} (${n})`));
  });
  legend.dataset.experts = JSON.stringify(counts.map((n, e) => (n ? e : -1)).filter(e => e >= 0));
}

function imagesView(section, box, images) {
  if (!images) return;
  section.hidden = false;
  box.textContent = "";
  for (const image of images) {
    const div = el("div", {className: "image"}, el("p", {}, `image ${image.index}: ${image.describe}, at positions ${image.first}-${image.last}`));
    div.dataset.views = image.views.length;
    image.views.forEach((b64, v) => {
      const n = image.view_size, bytes = atob(b64);
      const c = el("canvas", {width: n, height: n});
      const ctx = c.getContext("2d"), img = ctx.createImageData(n, n);
      for (let i = 0; i < n * n; i++) {
        for (let ch = 0; ch < 3; ch++) img.data[4 * i + ch] = bytes.charCodeAt(3 * i + ch);
        img.data[4 * i + 3] = 255;
      }
      ctx.putImageData(img, 0, 0);
      div.append(el("figure", {}, c, el("br"), v === 0 ? "global view" : `crop ${v}`));
    });
    box.append(div);
  }
}
