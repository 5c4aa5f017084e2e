"""The trace: one staged run of Mask R-CNN on one image, keeping what every stage produced.

    trace = run_trace(loaded_model, image_rgb_uint8)           # runs the network once
    dets = trace.refilter(Thresholds(score_thresh=0.7))        # no network: candidates are cached
    trace.set_rpn(RpnSettings(post_nms_top_n=300))             # RPN filtering + heads, never the backbone
    model_rpn_settings(loaded_model.model)                     # the RPN knobs a trace starts with

Stages (torchvision's GeneralizedRCNN.forward, taken apart): transform → backbone/FPN → RPN head
and anchors → proposal filtering (pre-NMS top-N per level, NMS per level, post-NMS top-N) → box
head on every proposal (the candidates: class probabilities and class-specific refined boxes) →
per-class (or class-agnostic) NMS → mask head (28×28 probabilities, memoised per candidate) → paste
into the image.

A trace starts with the model's own test-time RPN settings (``model_rpn_settings``: its arch's
``rpn_*_test`` values), as its forward uses them. With the thresholds the model was built with, the
detections equal torchvision's ``model(images)`` on the same weights (tests/test_trace_equivalence.py).
The shared model is only called, never changed: every knob is passed explicitly instead of being set on
the model's modules.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops
from torchvision.ops.poolers import _setup_scales

from mrcnn.inference import roi_align
from mrcnn.inference.input_size import check_input_size
from mrcnn.inference.precision import REDUCED_DTYPES, stage_autocast, to_float32
from mrcnn.inference.structures import Detections, RpnSettings, Thresholds
from mrcnn.model.paste import paste_masks_cropped, paste_mode
from mrcnn.model.zoo import LoadedModel

# torchvision's fixed constants in RPN filtering and detection post-processing
RPN_MIN_BOX_SIZE = 1e-3
DET_MIN_BOX_SIZE = 1e-2
# Fewer RoIs than this are pooled on the calling thread: a hand-off to the pool costs more than it saves.
PARALLEL_ROIS_MIN = 64
# Above this many boxes torchvision's CPU batched_nms runs one NMS per group (below it, one NMS over boxes
# offset per group): only there does splitting the groups over threads keep its result exactly.
VANILLA_NMS_MIN_BOXES = 1000


@dataclass
class Proposals:
    """RPN proposals in network-input pixels. ``*_pre`` = after per-level top-N, before NMS."""

    boxes_pre: torch.Tensor  # (M, 4)
    scores_pre: torch.Tensor  # (M,) objectness probability
    levels_pre: torch.Tensor  # (M,) FPN level index
    boxes: torch.Tensor  # (P, 4) kept after NMS and post-NMS top-N
    scores: torch.Tensor  # (P,)
    levels: torch.Tensor  # (P,)
    num_suppressed: int  # removed by NMS (not by the top-N cut)


@dataclass
class Candidates:
    """Box-head output for every proposal: what per-class NMS chooses detections from."""

    probs: torch.Tensor  # (P, C) softmax class probabilities
    boxes: torch.Tensor  # (P, C, 4) class-specific refined boxes, clipped, network-input pixels


def select_candidates(ids: torch.Tensor, scores: torch.Tensor, boxes: torch.Tensor, num_classes: int,
                      categories: list[str], t: Thresholds, apply_nms: bool = True):
    """Score thresholds, small-box removal, NMS and the top-N cut on foreground candidates given flat:
    ``ids`` (K,) proposal * C + class, ``scores`` (K,), ``boxes`` (K, 4), C = ``num_classes``.
    A subset holding every candidate above the thresholds gives the same result as the full set (a clip's
    frames keep only those, mrcnn.inference.video). Returns the kept (ids, scores, boxes), best first."""
    if t.class_thresh:
        per_class = torch.tensor([t.score_thresh_of(name) for name in categories[:num_classes]],
                                 dtype=scores.dtype, device=scores.device)
        keep = torch.where(scores > per_class[ids % num_classes])[0]
    else:
        keep = torch.where(scores > t.score_thresh)[0]
    ids, scores, boxes = ids[keep], scores[keep], boxes[keep]
    keep = box_ops.remove_small_boxes(boxes, DET_MIN_BOX_SIZE)
    ids, scores, boxes = ids[keep], scores[keep], boxes[keep]
    if apply_nms:
        if t.agnostic_nms:
            keep = box_ops.nms(boxes, scores, float(t.nms_thresh))
        else:
            keep = batched_nms(boxes, scores, ids % num_classes, float(t.nms_thresh))
        keep = keep[: int(t.max_detections)]
        ids, scores, boxes = ids[keep], scores[keep], boxes[keep]
    return ids, scores, boxes


_worker_pools: dict[int, ThreadPoolExecutor] = {}
_worker_pools_lock = threading.Lock()


def _workers(n: int) -> ThreadPoolExecutor:
    """Threads for torchvision's one-thread CPU kernels (RoIAlign, NMS), which release the GIL while they run."""
    with _worker_pools_lock:
        if n not in _worker_pools:
            _worker_pools[n] = ThreadPoolExecutor(n, thread_name_prefix="trace-worker")
        return _worker_pools[n]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_thresh: float) -> torch.Tensor:
    """``box_ops.batched_nms``, with the groups' NMS runs spread over the intra-op threads on a CPU. Above
    1000 boxes torchvision itself runs one NMS per group (on one thread) and merges them as here, so the kept
    indices and their order are the same; the bundled model's four 1000-proposal levels took 9 ms on one."""
    threads = torch.get_num_threads()
    if boxes.device.type != "cpu" or threads < 2 or boxes.shape[0] <= VANILLA_NMS_MIN_BOXES:
        return box_ops.batched_nms(boxes, scores, groups, iou_thresh)

    def kept(members: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return members[box_ops.nms(boxes[members], scores[members], iou_thresh)]

    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for kept_members in _workers(threads).map(kept, [torch.where(groups == g)[0] for g in torch.unique(groups)]):
        keep_mask[kept_members] = True
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True)[1]]


def pool_rois(pooler, features: OrderedDict[str, torch.Tensor], boxes: torch.Tensor,
              image_size: tuple[int, int]) -> torch.Tensor:
    """``pooler(features, [boxes], [image_size])`` (a MultiScaleRoIAlign), with the RoIs split across the
    intra-op threads on a CPU: torchvision's CPU RoIAlign runs on one thread, and took about a third of a
    bfloat16 R50 run here. Each RoI's output depends on that RoI alone, so the split result is identical."""
    threads = torch.get_num_threads()
    if boxes.device.type != "cpu" or threads < 2 or boxes.shape[0] < PARALLEL_ROIS_MIN:
        return pooler(features, [boxes], [image_size])

    def pool(chunk: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # thread-local, as is autocast (the poolers run outside it)
            return pooler(features, [chunk], [image_size])

    return torch.cat(list(_workers(threads).map(pool, boxes.tensor_split(threads))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trace:
    """Everything one image's run produced, plus re-filtering that reuses it. See the module docstring."""

    # Around a backbone re-run of dropped features, given the trace: the trace cache puts its run slot and
    # memory reservation here (mrcnn.inference.trace_cache); nothing otherwise.
    backbone_rerun = staticmethod(lambda trace: nullcontext())

    def __init__(self, loaded: LoadedModel, image: np.ndarray, thresholds: Thresholds | None = None,
                 rpn: RpnSettings | None = None):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
        check_input_size(loaded.model, image.shape[0], image.shape[1])  # ImageError for an image too thin to run
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.precision = loaded.precision  # the network stages run in it; what they hand back is float32
        self.categories = loaded.categories
        self.image = image
        self.original_size = (int(image.shape[0]), int(image.shape[1]))
        self.thresholds = thresholds or Thresholds()
        self.rpn_settings = rpn or model_rpn_settings(loaded.model)
        self.timings_ms: dict[str, float] = OrderedDict()
        self._mask_memo: dict[int, torch.Tensor] = {}  # candidate id -> (28, 28) probabilities
        self._paste_memo: dict[int, tuple[int, int, np.ndarray]] = {}  # id -> (y0, x0, float32 crop)
        self.last_refilter_ms = 0.0
        self.last_mask_ms = 0.0  # of the last refilter: mask head + pasting for candidates not seen before
        self._run_network()

    # ---- timing -------------------------------------------------------------------------------
    @contextmanager
    def _timed(self, stage: str):
        store = self.timings_ms
        _sync(self.device)
        start = time.perf_counter()
        yield
        _sync(self.device)
        store[stage] = store.get(stage, 0.0) + (time.perf_counter() - start) * 1000.0

    # ---- the network, once ----------------------------------------------------------------------
    @torch.inference_mode()
    def _run_network(self) -> None:
        model = self.model
        with self._timed("transform"):
            image_list = self._transform()
        self._image_list = image_list
        self.input_size = tuple(int(s) for s in image_list.image_sizes[0])  # (h, w) after resize
        self.padded_size = tuple(int(s) for s in image_list.tensors.shape[-2:])

        with self._timed("backbone"):
            network_maps = self._network_features(image_list)
            self._keep_features(network_maps)
        feature_list = list(self._features.values())

        with self._timed("rpn_head"):
            with self._network():
                objectness, deltas = model.rpn.head(list(network_maps.values()))
            del network_maps
            anchors = model.rpn.anchor_generator(image_list, feature_list)[0]
            # per level (1, A, Hi, Wi) -> A * Hi * Wi anchors
            self.num_anchors_per_level = [int(o[0].numel()) for o in objectness]
            self.objectness_maps = [o[0] for o in objectness]  # (A, Hi, Wi) logits
            self.delta_maps = [d[0] for d in deltas]  # (A*4, Hi, Wi)
            flat_obj, flat_deltas = concat_box_prediction_layers(objectness, deltas)
            self.anchors = anchors  # (sum A*Hi*Wi, 4) ordered (level, y, x, anchor)
            self.anchor_objectness = flat_obj.reshape(-1)  # logits, same order as anchors
            self.anchor_proposals = model.rpn.box_coder.decode(flat_deltas, [anchors]).reshape(-1, 4)

        self._run_heads()
        self.detections = self.refilter(self.thresholds)
        self.timings_ms["detections"] = self.last_refilter_ms - self.last_mask_ms
        self.timings_ms["masks"] = self.last_mask_ms

    def _transform(self):
        """The network input: resized, normalised, padded (torchvision's ImageList of one image)."""
        # torch warns (on the user's stderr) about a read-only array, e.g. np.asarray of a PIL image; the
        # .float() below copies it anyway, so nothing ever writes to it
        pixels = self.image if self.image.flags.writeable else self.image.copy()
        tensor = torch.from_numpy(pixels).to(self.device).permute(2, 0, 1).float().div_(255.0)
        return self.model.transform([tensor])[0]

    def _network_features(self, image_list) -> OrderedDict[str, torch.Tensor]:
        """The FPN maps as the network made them: in a reduced precision, channels-last maps of that dtype
        (``forward`` skips the float32 cast that prepare_model hooks on for torchvision's own forward)."""
        with self._network():
            if self.precision == "float32":
                return self.model.backbone(image_list.tensors)
            return self.model.backbone.forward(image_list.tensors)

    def _keep_features(self, network_maps: OrderedDict[str, torch.Tensor]) -> None:
        """Keep the maps the trace shows and pools from, in float32. A reduced precision on a CPU keeps them
        in one table of pixel rows (mrcnn.inference.roi_align.PixelRows), which its RoIAlign gathers from;
        elsewhere they are contiguous, as torchvision's RoIAlign reads them."""
        self._pixel_rows = None
        if self.precision == "float32":
            self._features = network_maps
        elif self.device.type == "cpu" and roi_align.PixelRows.fits(network_maps):
            self._pixel_rows = roi_align.PixelRows(network_maps)
            self._features = self._pixel_rows.maps
        else:
            self._features = to_float32(network_maps)

    def _network(self):
        """Around the modules that compute: autocast in a reduced precision (their outputs come back
        float32: mrcnn.inference.precision.prepare_model), nothing in float32."""
        return stage_autocast(self.precision, self.device)

    def _pool(self, pooler, boxes: torch.Tensor) -> torch.Tensor:
        """RoIAlign of ``boxes`` on the kept maps. float32 runs torchvision's kernel, which the equivalence
        tests pin bit for bit; a reduced precision, already rounded, the ~10x faster gathers of
        mrcnn.inference.roi_align (the same values to float rounding)."""
        features = self.features  # runs the backbone again if the maps were dropped
        if self._pixel_rows is not None and roi_align.supports(pooler, self.device):
            return roi_align.multiscale_roi_align(pooler, self._pixel_rows, boxes, self.input_size)
        return pool_rois(pooler, features, boxes, self.input_size)

    # ---- memory: the feature maps can be dropped and come back on demand ---------------------------
    @property
    def image_list(self):
        """The network input (see ``_transform``); recomputed after ``drop_features``."""
        image_list = self._image_list
        if image_list is None:
            with torch.inference_mode():
                image_list = self._image_list = self._transform()
        return image_list

    @property
    def features(self) -> OrderedDict[str, torch.Tensor]:
        """The FPN feature maps, level name -> (1, channels, Hi, Wi); after ``drop_features``, the
        backbone runs again (same input, same values) the first time something asks for them."""
        features = self._features
        if features is None:
            with self.backbone_rerun(self), torch.inference_mode():
                self._keep_features(self._network_features(self.image_list))
            features = self._features
        return features

    @property
    def has_features(self) -> bool:
        return self._features is not None

    def drop_features(self) -> None:
        """Free the feature maps and the network input, most of a trace's memory (mrcnn.inference.trace_cache).
        Re-filtering whose masks were seen before needs neither."""
        self._features = self._pixel_rows = None
        self._image_list = None

    def _run_heads(self) -> None:
        """RPN filtering and the box head: everything downstream of the cached features."""
        with self._timed("rpn_filter"):
            self.proposals = self._filter_proposals(self.rpn_settings)
        with self._timed("box_head"):
            self.candidates = self._box_head(self.proposals.boxes)
        self._mask_memo.clear()
        self._paste_memo.clear()

    def _filter_proposals(self, rpn: RpnSettings) -> Proposals:
        """torchvision's RegionProposalNetwork.filter_proposals, keeping the pre-NMS set as well."""
        top_idx, levels, offset = [], [], 0
        for level, (n, logits) in enumerate(zip(self.num_anchors_per_level,
                                               self.anchor_objectness.split(self.num_anchors_per_level))):
            k = min(int(rpn.pre_nms_top_n), n)
            _, idx = logits.topk(k)
            top_idx.append(idx + offset)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=self.device))
            offset += n
        idx = torch.cat(top_idx)
        lvl = torch.cat(levels)
        scores = torch.sigmoid(self.anchor_objectness[idx])
        boxes = box_ops.clip_boxes_to_image(self.anchor_proposals[idx], self.input_size)
        keep = box_ops.remove_small_boxes(boxes, RPN_MIN_BOX_SIZE)
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = torch.where(scores >= rpn.score_thresh)[0]
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = batched_nms(boxes, scores, lvl, float(rpn.nms_thresh))
        suppressed = int(boxes.shape[0] - keep.shape[0])
        keep = keep[: int(rpn.post_nms_top_n)]
        return Proposals(boxes, scores, lvl, boxes[keep], scores[keep], lvl[keep], suppressed)

    def _box_head(self, proposals: torch.Tensor) -> Candidates:
        heads = self.model.roi_heads
        feats = self._pool(heads.box_roi_pool, proposals)
        if self._pixel_rows is not None:
            # Cast as autocast would at the head's first layer, but before the head flattens the channels-last
            # pool: that copy then moves half the bytes (R50's 1000 RoIs: ~26 -> ~11 ms). Same values.
            feats = feats.to(REDUCED_DTYPES[self.precision])
        with self._network():
            class_logits, box_regression = heads.box_predictor(heads.box_head(feats))
        boxes = heads.box_coder.decode(box_regression, [proposals])  # (P, C, 4)
        boxes = box_ops.clip_boxes_to_image(boxes, self.input_size)
        return Candidates(torch.softmax(class_logits, -1), boxes)

    # ---- re-running from cached features ----------------------------------------------------------
    @torch.inference_mode()
    def set_rpn(self, rpn: RpnSettings) -> Detections:
        """New RPN knobs: re-filter proposals and re-run the heads from the cached features."""
        self.rpn_settings = rpn
        for stage in ("rpn_filter", "box_head"):
            self.timings_ms.pop(stage, None)
        self._run_heads()
        self.detections = self.refilter(self.thresholds)
        return self.detections

    @torch.inference_mode()
    def refilter(self, thresholds: Thresholds) -> Detections:
        """Detections for new thresholds from the cached candidates (the mask head runs only for
        candidates not seen before; every other stage is reused)."""
        start = time.perf_counter()
        self.last_mask_ms = 0.0
        self.detections = self._filtered(thresholds)
        self.thresholds = thresholds
        self.last_refilter_ms = (time.perf_counter() - start) * 1000.0
        return self.detections

    @torch.inference_mode()
    def detections_at(self, thresholds: Thresholds) -> Detections:
        """Detections for other thresholds, the trace left as it is (its thresholds, detections and timings
        are those of the last ``refilter``): for a page that draws what the next control step would show."""
        mask_ms = self.last_mask_ms
        try:
            return self._filtered(thresholds)
        finally:
            self.last_mask_ms = mask_ms

    def _filtered(self, thresholds: Thresholds) -> Detections:
        thresholds.check_classes(self.categories)
        keep_ids, scores, boxes = self._select(thresholds)
        labels = keep_ids % self.num_classes
        boxes_orig = resize_boxes(boxes, self.input_size, self.original_size)
        masks = None
        if self.loaded.has_masks:
            masks = self._masks(keep_ids, boxes, boxes_orig, thresholds.mask_thresh)
        return Detections(
            boxes=boxes_orig.float().cpu().numpy().astype(np.float32).reshape(-1, 4),
            scores=scores.float().cpu().numpy().astype(np.float32),
            labels=labels.cpu().numpy().astype(np.int64),
            masks=masks,
            candidate_ids=keep_ids.cpu().numpy().astype(np.int64),
            categories=self.categories,
            image_size=self.original_size,
        )

    @property
    def num_classes(self) -> int:
        return int(self.candidates.probs.shape[1])

    def _select(self, t: Thresholds, apply_nms: bool = True):
        """torchvision's RoIHeads.postprocess_detections on the cached candidates, plus per-class score
        thresholds and class-agnostic NMS when ``t`` asks for them.

        Returns candidate ids (proposal * C + class), scores and boxes (network-input pixels)."""
        probs, boxes = self.candidates.probs, self.candidates.boxes
        num_props, num_classes = probs.shape
        ids = torch.arange(num_props * num_classes, device=probs.device).view(num_props, num_classes)
        ids, scores, boxes = ids[:, 1:].reshape(-1), probs[:, 1:].reshape(-1), boxes[:, 1:].reshape(-1, 4)
        return select_candidates(ids, scores, boxes, num_classes, self.categories, t, apply_nms)

    # ---- masks --------------------------------------------------------------------------------------
    def mask_probs_28(self, candidate_ids, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """(N, M, M) mask-head probabilities of these candidates' classes, computed once per candidate."""
        ids = [int(i) for i in candidate_ids]
        missing = [i for i in ids if i not in self._mask_memo]
        if missing:
            t0 = time.perf_counter()
            with torch.inference_mode():
                if boxes is None:
                    miss_boxes = self.candidate_boxes(missing)
                else:
                    pos = {cid: n for n, cid in enumerate(ids)}
                    miss_boxes = boxes[[pos[i] for i in missing]]
                heads = self.model.roi_heads
                feats = self._pool(heads.mask_roi_pool, miss_boxes)
                with self._network():
                    # forward, not the module's call: skips the float32 cast prepare_model hooks on for
                    # torchvision's forward, which would copy every class's map (R50: 91 per RoI, ~13 ms for
                    # 100 RoIs); only each candidate's own class is cast below, to the same values.
                    logits = heads.mask_predictor.forward(heads.mask_head(feats))  # (n, C, M, M)
                labels = torch.tensor([i % self.num_classes for i in missing], device=logits.device)
                probs = logits[torch.arange(len(missing), device=logits.device), labels].float().sigmoid()
                for cid, p in zip(missing, probs):
                    self._mask_memo[cid] = p
            _sync(self.device)
            self.last_mask_ms += (time.perf_counter() - t0) * 1000.0
        if not ids:
            size = self.model.roi_heads.mask_roi_pool.output_size[0] * 2
            return torch.zeros((0, size, size), device=self.device)
        return torch.stack([self._mask_memo[i] for i in ids])

    def candidate_boxes(self, candidate_ids) -> torch.Tensor:
        """Refined boxes (network-input pixels) of these candidates."""
        ids = torch.as_tensor([int(i) for i in candidate_ids], dtype=torch.int64, device=self.device)
        return self.candidates.boxes[ids // self.num_classes, ids % self.num_classes].reshape(-1, 4)

    def _masks(self, ids: torch.Tensor, boxes: torch.Tensor, boxes_orig: torch.Tensor,
               mask_thresh: float) -> np.ndarray:
        h, w = self.original_size
        out = np.zeros((len(ids), h, w), dtype=bool)
        if len(ids) == 0:
            return out
        id_list = [int(i) for i in ids]
        need = [n for n, cid in enumerate(id_list) if cid not in self._paste_memo]
        if need:
            probs = self.mask_probs_28([id_list[n] for n in need], boxes[need])
            t0 = time.perf_counter()
            pasted = paste_masks_cropped(probs, boxes_orig[need], self.original_size, paste_mode(self.model))
            for n, crop in zip(need, pasted):
                self._paste_memo[id_list[n]] = crop
            self.last_mask_ms += (time.perf_counter() - t0) * 1000.0
        for n, cid in enumerate(id_list):
            y0, x0, crop = self._paste_memo[cid]
            out[n, y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop > mask_thresh
        return out

    def mask_probs_full(self, candidate_id: int) -> np.ndarray:
        """The pasted full-size probability map of one candidate (original-image pixels)."""
        cid = int(candidate_id)
        if cid not in self._paste_memo:
            box = self.candidate_boxes([cid])
            self._masks(torch.tensor([cid]), box, resize_boxes(box, self.input_size, self.original_size), 0.5)
        y0, x0, crop = self._paste_memo[cid]
        full = np.zeros(self.original_size, np.float32)
        full[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
        return full

    # ---- what the inspector asks about ------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """Network-input pixels per original pixel."""
        return self.input_size[0] / self.original_size[0]

    def to_original(self, boxes: torch.Tensor) -> np.ndarray:
        """Boxes in network-input pixels -> float32 numpy boxes in original-image pixels."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        return resize_boxes(boxes, self.input_size, self.original_size).cpu().numpy().astype(np.float32)

    @property
    def level_names(self) -> list[str]:
        return list(self.features.keys())

    def anchor_settings(self) -> dict:
        gen = self.model.rpn.anchor_generator
        return {"sizes": [list(s) for s in gen.sizes], "aspect_ratios": [list(a) for a in gen.aspect_ratios]}

    def anchors_at(self, level: int, y: int, x: int) -> torch.Tensor:
        """The anchors centred on feature-map cell (y, x) of a level, network-input pixels."""
        num_a, fh, fw = self.objectness_maps[level].shape
        if not (0 <= y < fh and 0 <= x < fw):
            raise ValueError(f"cell ({y}, {x}) is outside level {level}'s {fh}x{fw} grid")
        start = sum(self.num_anchors_per_level[:level]) + (y * fw + x) * num_a
        return self.anchors[start:start + num_a]

    def proposal_of(self, candidate_id: int) -> tuple[torch.Tensor, float, int]:
        """The RPN proposal a candidate was refined from: (box, objectness, level)."""
        p = int(candidate_id) // self.num_classes
        return self.proposals.boxes[p], float(self.proposals.scores[p]), int(self.proposals.levels[p])

    @torch.inference_mode()
    def roi_crops(self, candidate_id: int) -> dict:
        """The RoIAlign inputs of one detection: the FPN level each box was assigned to and the crops
        fed to the box head (its proposal, 7×7) and the mask head (its refined box, 14×14)."""
        heads = self.model.roi_heads
        proposal, _, _ = self.proposal_of(candidate_id)
        det_box = self.candidate_boxes([candidate_id])
        out = {}
        for key, pooler, box in (("box", heads.box_roi_pool, proposal[None]), ("mask", heads.mask_roi_pool, det_box)):
            feats = [self.features[k] for k in pooler.featmap_names]
            _, mapper = _setup_scales(feats, [self.input_size], pooler.canonical_scale, pooler.canonical_level)
            level = int(mapper([box])[0])
            crop = self._pool(pooler, box)[0]  # (channels, S, S), pooled as the head's input was
            out[key] = {"level": level, "level_name": pooler.featmap_names[level],
                        "crop": crop.float().contiguous().cpu(),
                        "box": box[0].float().cpu()}
        return out

    def class_probs(self, candidate_id: int) -> np.ndarray:
        """The box head's class probabilities for a detection's proposal (all classes)."""
        p = int(candidate_id) // self.num_classes
        return self.candidates.probs[p].float().cpu().numpy()

    @torch.inference_mode()
    def nms_summary(self, thresholds: Thresholds | None = None) -> list[dict]:
        """Per class: candidates above the score threshold before NMS, and how many NMS kept."""
        t = thresholds or self.thresholds
        ids, _, _ = self._select(t, apply_nms=False)
        before = torch.bincount(ids % self.num_classes, minlength=self.num_classes).cpu().numpy()
        kept_ids, _, _ = self._select(t)
        kept = torch.bincount(kept_ids % self.num_classes, minlength=self.num_classes).cpu().numpy()
        return [{"class": self.categories[c], "before_nms": int(before[c]), "kept": int(kept[c])}
                for c in range(1, self.num_classes) if before[c] > 0]

    def proposals_original(self, top_k: int | None = None, before_nms: bool = False):
        """Proposal boxes (original pixels) and scores, highest first, for drawing."""
        boxes = self.proposals.boxes_pre if before_nms else self.proposals.boxes
        scores = self.proposals.scores_pre if before_nms else self.proposals.scores
        order = torch.argsort(scores, descending=True)
        if top_k is not None:
            order = order[:top_k]
        return self.to_original(boxes[order]), scores[order].float().cpu().numpy()

    @property
    def network_ms(self) -> float:
        return sum(self.timings_ms.values())


def model_rpn_settings(model: torch.nn.Module) -> RpnSettings:
    """The RPN settings ``model``'s own forward uses in eval mode (torchvision's rpn_*_test arguments)."""
    rpn = model.rpn
    return RpnSettings(pre_nms_top_n=int(rpn._pre_nms_top_n["testing"]),
                       post_nms_top_n=int(rpn._post_nms_top_n["testing"]),
                       nms_thresh=float(rpn.nms_thresh), score_thresh=float(rpn.score_thresh))


def run_trace(loaded: LoadedModel, image: np.ndarray, thresholds: Thresholds | None = None,
              rpn: RpnSettings | None = None) -> Trace:
    """Run the network once on an RGB uint8 image, stage by stage, with ``rpn`` (None: the model's own,
    ``model_rpn_settings``). See Trace."""
    return Trace(loaded, image, thresholds, rpn)
