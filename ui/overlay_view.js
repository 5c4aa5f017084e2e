// Detect's picture (ui/overlay_view.py): the overlay in an <img>, one SVG polygon per instance over it for
// the hover, both zoomed together by one CSS transform. Streamlit calls this function again with the same
// parentElement whenever the data changes: the view is built once and then updated in place.
//
// A second, hidden instance brings the pictures for the next values of a slider (data.next). Both
// instances run this one module, so they share `ahead`: when that slider's value changes to one of those
// values, the picture is shown from there at once, before the page's round trip brings it.
const MAX_ZOOM = 64;
const DRAG_MIN_PX = 5;  // a shorter drag is a click, not a zoom rectangle
const SVG_NS = "http://www.w3.org/2000/svg";
const views = new Set();
let ahead = null;  // {slider, value, shown, pictures: {value: data}, decoded: {value: true}}
let watching = false;

function clamp(v, lo, hi) { return Math.min(Math.max(v, lo), hi); }

function build(root) {
  const box = document.createElement("div");
  box.className = "mrcnn-ov";
  const stage = document.createElement("div");
  stage.className = "mrcnn-ov-stage";
  const img = document.createElement("img");
  img.className = "mrcnn-ov-picture";
  img.alt = "detections";
  img.draggable = false;
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("class", "mrcnn-ov-regions");
  svg.setAttribute("preserveAspectRatio", "none");
  const rect = document.createElement("div");
  rect.className = "mrcnn-ov-rect";
  const tip = document.createElement("div");
  tip.className = "mrcnn-ov-tip";
  stage.append(img, svg);
  box.append(stage, rect, tip);
  root.appendChild(box);
  // zoom: scale s, translation (fx, fy) as fractions of the box, so a resized page keeps the same view
  const view = { box, stage, img, svg, rect, tip, s: 1, fx: 0, fy: 0, seq: 0, key: null, regions: [], drag: null };

  const local = (e) => { const r = box.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
  box.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    view.drag = { start: local(e), moved: false };
    box.setPointerCapture(e.pointerId);
    hideTip(view);
  });
  box.addEventListener("pointermove", (e) => {
    const [x, y] = local(e);
    if (view.drag) {
      const [x0, y0] = view.drag.start;
      view.drag.moved ||= Math.hypot(x - x0, y - y0) >= DRAG_MIN_PX;
      if (view.drag.moved) {
        Object.assign(rect.style, { display: "block", left: `${Math.min(x, x0)}px`, top: `${Math.min(y, y0)}px`,
                                    width: `${Math.abs(x - x0)}px`, height: `${Math.abs(y - y0)}px` });
      }
      return;
    }
    const k = e.target instanceof SVGPolygonElement ? Number(e.target.dataset.k) : -1;
    if (k >= 0) showTip(view, view.regions[k].lines, x, y); else hideTip(view);
  });
  box.addEventListener("pointerup", (e) => {
    const drag = view.drag;
    view.drag = null;
    rect.style.display = "none";
    if (drag && drag.moved) {
      const [x, y] = local(e);
      zoomToRect(view, Math.min(x, drag.start[0]), Math.min(y, drag.start[1]),
                 Math.abs(x - drag.start[0]), Math.abs(y - drag.start[1]));
    }
  });
  box.addEventListener("pointercancel", () => { view.drag = null; rect.style.display = "none"; });
  box.addEventListener("pointerleave", () => hideTip(view));
  box.addEventListener("wheel", (e) => {
    e.preventDefault();  // the page does not scroll while the wheel zooms the picture
    const [x, y] = local(e);
    zoomAt(view, x, y, Math.exp(-e.deltaY / 500));
  }, { passive: false });
  box.addEventListener("dblclick", () => setZoom(view, 1, 0, 0));
  return view;
}

function setZoom(view, s, fx, fy) {
  view.s = clamp(s, 1, MAX_ZOOM);
  // the picture always covers the box: no empty margin beside a zoomed picture
  view.fx = clamp(fx, 1 - view.s, 0);
  view.fy = clamp(fy, 1 - view.s, 0);
  view.stage.style.transform = view.s === 1 ? "" :
    `translate(${view.fx * 100}%, ${view.fy * 100}%) scale(${view.s})`;
  // once a picture pixel spans several screen pixels, show pixels, not a blur (as plotly's image did)
  const screenPerPixel = view.s * view.box.clientWidth / Math.max(view.width || 1, 1);
  view.stage.classList.toggle("mrcnn-ov-pixelated", screenPerPixel >= 3);
  view.box.dataset.zoom = view.s.toFixed(3);
}

function zoomAt(view, x, y, factor) {
  const w = view.box.clientWidth, h = view.box.clientHeight;
  const s = clamp(view.s * factor, 1, MAX_ZOOM);
  const r = s / view.s;  // the point under the cursor stays put
  setZoom(view, s, x / w - (x / w - view.fx) * r, y / h - (y / h - view.fy) * r);
}

function zoomToRect(view, x, y, rw, rh) {
  const w = view.box.clientWidth, h = view.box.clientHeight;
  const s = clamp(view.s * Math.min(w / Math.max(rw, 1), h / Math.max(rh, 1)), 1, MAX_ZOOM);
  // the rectangle's centre in the unzoomed picture, as fractions of the box; then put it in the middle
  const cx = ((x + rw / 2) / w - view.fx) / view.s, cy = ((y + rh / 2) / h - view.fy) / view.s;
  setZoom(view, s, 0.5 - cx * s, 0.5 - cy * s);
}

function showTip(view, lines, x, y) {
  const tip = view.tip;
  const [title, ...rest] = lines;
  const b = document.createElement("b");
  b.textContent = title;  // text, never HTML: class names come from a checkpoint
  tip.replaceChildren(b, ...rest.flatMap((line) => [document.createElement("br"), line]));
  tip.style.display = "block";
  const w = view.box.clientWidth, h = view.box.clientHeight;
  const left = x + 14 + tip.offsetWidth > w ? x - 14 - tip.offsetWidth : x + 14;
  const top = clamp(y + 14, 0, Math.max(h - tip.offsetHeight, 0));
  tip.style.left = `${Math.max(left, 0)}px`;
  tip.style.top = `${top}px`;
}

function hideTip(view) { view.tip.style.display = "none"; }

function show(view, data, from) {
  view.signature = data.signature;
  view.box.dataset.shownFrom = from;  // "server" or "ahead" (tests/test_overlay_view.py reads it)
  const sameImage = data.image_key === view.key && data.width === view.width && data.height === view.height;
  view.key = data.image_key;
  view.width = data.width;
  view.height = data.height;
  view.regions = data.regions;
  const box = view.box;
  box.style.width = `min(100%, ${(data.shown_height * data.width) / data.height}px)`;
  box.style.aspectRatio = `${data.width} / ${data.height}`;
  // outlines in original pixels; pixel i spans [i - 0.5, i + 0.5]
  view.svg.setAttribute("viewBox", `-0.5 -0.5 ${data.width} ${data.height}`);
  view.svg.replaceChildren(...data.regions.map((region, k) => {
    const p = document.createElementNS(SVG_NS, "polygon");
    p.setAttribute("points", region.points);
    p.dataset.k = String(k);
    p.dataset.index = String(region.index);
    if (region.chosen) p.setAttribute("class", "mrcnn-ov-chosen");
    return p;
  }));
  view.img.src = data.src;
  hideTip(view);
  if (!sameImage) setZoom(view, 1, 0, 0);
}

function decoded(src) {
  const picture = new Image();
  picture.src = src;
  return picture.decode().catch(() => {});
}

// A slider moved: show the picture sent ahead for its new value, if there is one for what is shown now.
// (benchmarks/page_latency.py --round-trip sets window.mrcnnOverlayAhead = false to time the round trip alone)
function sliderMoved(input) {
  if (!ahead || window.mrcnnOverlayAhead === false || input.getAttribute("aria-label") !== ahead.slider) return;
  const value = Number(input.value).toFixed(2);
  const back = value === ahead.value;  // back where the server drew: its picture again (no rerun follows)
  if (!back && !(ahead.pictures[value] && ahead.decoded[value])) return;
  for (const view of views) {
    if (!view.box.isConnected) { views.delete(view); continue; }
    if (view.fromServer.signature !== ahead.shown) continue;
    const data = back ? view.fromServer : ahead.pictures[value];
    if (data.signature === view.signature) continue;
    view.seq++;  // a picture still decoding for an older value must not replace this one
    show(view, data, back ? "server" : "ahead");
  }
}

function watchSliders() {
  if (watching) return;
  watching = true;
  // the slider's <input type="range"> gets its new value (and aria-valuetext) in the key press's own
  // React update; "input" covers a browser that changes it natively
  new MutationObserver((records) => {
    for (const r of records) if (r.target instanceof HTMLInputElement) sliderMoved(r.target);
  }).observe(document.body, { subtree: true, attributes: true, attributeFilter: ["aria-valuetext"] });
  document.addEventListener("input", (e) => {
    if (e.target instanceof HTMLInputElement && e.target.type === "range") sliderMoved(e.target);
  }, true);
}

function offer(next) {
  const state = { ...next, decoded: {} };
  ahead = state;
  for (const [value, data] of Object.entries(next.pictures)) {
    decoded(data.src).then(() => { state.decoded[value] = true; });
  }
}

export default function (component) {
  const { data, parentElement } = component;
  if (!data) return;
  if (data.next) {
    parentElement.classList.add("mrcnn-ov-ahead");  // nothing to see: its element takes no room
    watchSliders();
    offer(data.next);
    return;
  }
  const view = parentElement.__mrcnnOverlay ||= build(parentElement);
  views.add(view);
  view.fromServer = data;
  const seq = ++view.seq;
  if (data.signature === view.signature) return;  // shown already, from the pictures sent ahead
  // decoded before it is shown: the old picture stays until the new one can be painted, and the
  // outlines change with it; of pictures that arrive quickly one after another only the last is shown
  decoded(data.src).then(() => { if (seq === view.seq) show(view, data, "server"); });
}
