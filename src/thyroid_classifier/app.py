"""The Gradio app: upload an ultrasound frame, see every class's confidence and the Grad-CAM heatmap.

``build_demo(predictors)`` returns the Blocks and loads nothing itself; :func:`main` parses the
command line (``python app.py --help``), loads the models and launches on 127.0.0.1.

Privacy: an upload is read once and deleted from the server's temporary folder a minute later (not
at once: identical uploads share one file); every file the app or gradio keeps (rejected and
never-analysed uploads, the images shown back) is deleted within :data:`FORGET_WITHIN` seconds by
gradio's cache clean-up; no file name reaches the log; no run history is kept in the browser.

Memory: an image's declared size is checked before decoding (``preprocess.MAX_PIXELS``), large
legal images are decoded reduced, and every request holds its images' bytes from one budget shared
by all (:class:`~thyroid_classifier.serving.MemoryBudget`: decoding, the frame, its crop and
heatmap), so a burst of large uploads takes its turns while ordinary frames go ahead; the session
keeps display-sized copies only.

Speed: models are loaded and run on the fixed threads of a :class:`~thyroid_classifier.serving.ModelRunner`,
which gives the requests that wait while the model is busy one forward pass together.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from .explain import overlay
from .preprocess import ImageError, nodule_square, probe_image
from .answer_rule import UNSEEN
from .answer_text import descriptor_facts, descriptor_lines
from .serving import MAX_BATCH, BackgroundWorker, GiveBackWhenIdle, MemoryBudget, ModelRunner
from .uploads import UploadJanitor, cache_image, private_file_folder, safe_name

logger = logging.getLogger(__name__)

#: What the page says whatever the model (the app's own promises); what it says about the model comes from its folder.
PAGE_NOTICE = (
    "**Research software, not a diagnosis.** Its output must not guide the care of a patient. "
    "Upload a grey-scale thyroid ultrasound frame (at most 10 MB and 40 million pixels). The upload and the images "
    "shown back are deleted from the server within two minutes; nothing is kept in your browser's history."
)


def notice(info: Mapping) -> str:
    """The page's notice for a model: the app's promises, then what the model was trained on (its folder)."""
    from .answer_text import training_notice

    return f"{PAGE_NOTICE}\n\n{training_notice(info)}"


DEFAULT_MODELS = ("outputs/sample/resnet50",)
MAX_FILE_SIZE = "10mb"
#: Uploads are deleted this many seconds after they are read ...
FORGET_UPLOAD_AFTER = 60.0
#: ... and gradio's clean-up removes every file of the app older than AGE, every FREQUENCY seconds:
#: nothing outlives FORGET_WITHIN = AGE + FREQUENCY (90 s: the page promises two minutes).
CACHE_CLEANUP = (30, 60)  # (frequency, age) in seconds
FORGET_WITHIN = sum(CACHE_CLEANUP)
#: The longer side of what the page shows and the session keeps (the opacity control reblends it).
DISPLAY_SIDE = 1024
#: The upload is never shown larger than its pixels: gradio 6 turns a click on it into the image's pixels assuming it is
#: not (its scale is capped at 1), so on an enlarged small frame a clicked nodule corner would land elsewhere.
PAGE_CSS = ".upload-frame .image-frame img { object-fit: scale-down !important; }"
#: Requests the app works on at once (the rest wait in gradio's queue, up to QUEUE_SIZE more). Each
#: opens its upload at once (so its file cannot be deleted from under it while it waits) and then
#: waits for room in the memory budget and for the model, which bound what they cost together.
IN_FLIGHT = 128
QUEUE_SIZE = 64
#: Bytes a request holds per pixel of its decoded frame until it is done: the RGB frame (4), its
#: crop's grey and float maps, the heatmap (float32) and the display copies.
WORKING_BYTES_PER_PIXEL = 16
#: gradio's queue keeps a record of its last 10000 events and, after every event, summarises them all
#: with pandas for its /monitoring dashboard (which the app turns off): 12 ms of CPU an event once a
#: server has run 10000, 2 ms at 100. The app keeps one record and never summarises (a setting the
#: environment can still override).
QUEUE_ANALYTICS = {"GRADIO_ANALYTICS_MAX_EVENTS": "1", "GRADIO_ANALYTICS_CACHE_FREQUENCY": str(2**62)}


def display_copy(image):
    """``image`` (PIL) reduced to at most DISPLAY_SIDE a side, as a new image."""
    shown = image.copy()
    shown.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
    return shown


def display_state(image, heatmap: np.ndarray) -> dict:
    """What a session keeps for the opacity control: ``image`` (PIL) at display size (one channel when
    it is grey, as ultrasound is: a third of the memory, the same pixels) and the heatmap (values in
    [0, 1], the image's size) as uint8 at that size."""
    shown = display_copy(image)
    original = np.asarray(shown)
    if original.ndim == 3 and (original == original[..., :1]).all():
        original = np.ascontiguousarray(original[..., 0])
    return {"original": original, "heatmap": np.asarray(_as_image(np.uint8(np.round(heatmap * 255))).resize(shown.size))}


def blended(state: Mapping, opacity: float) -> tuple[np.ndarray, np.ndarray]:
    """The slider's two halves from a session's state: the display-sized image and its overlay, each with the
    nodule box the descriptors were read from, when one was given (``state["nodule"]``, display pixels)."""
    halves = state["original"], overlay(_as_image(state["original"]), state["heatmap"] / 255.0, opacity)
    box = state.get("nodule")
    return tuple(_with_box(half, box) for half in halves) if box else halves


def _with_box(pixels: np.ndarray, box: Sequence[float]) -> np.ndarray:
    from PIL import ImageDraw

    image = _as_image(pixels).convert("RGB")
    ImageDraw.Draw(image).rectangle([round(v) for v in box], outline=(0, 200, 255), width=max(2, round(max(image.size) / 250)))
    return np.asarray(image)


def parse_nodule_box(text: str | None) -> tuple[float, float, float, float] | None:
    """The page's nodule box: "left, top, right, bottom" in the upload's pixels (commas or spaces); None when empty.
    Raises ValueError saying what to do for anything else (one corner only, words, negative numbers)."""
    numbers = (text or "").replace(",", " ").split()
    if not numbers:
        return None
    try:
        values = [float(n) for n in numbers]
    except ValueError:
        raise ValueError(f"the nodule box is four numbers (left, top, right, bottom in the image's pixels), not {text.strip()!r}") from None
    if len(values) == 2:
        raise ValueError("the nodule box has one corner: click the opposite corner of the nodule too (or clear the box)")
    if len(values) != 4 or any(v < 0 or not math.isfinite(v) for v in values):
        raise ValueError(f"the nodule box is four numbers of 0 or more (left, top, right, bottom in the image's pixels), not {text.strip()!r}")
    x0, y0, x1, y1 = values
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def next_corner(text: str | None, x: float, y: float) -> str:
    """A click on the image at (x, y): the first corner of a new box, or, after one corner, the box they span."""
    numbers = (text or "").replace(",", " ").split()
    if len(numbers) == 2:
        try:
            x0, y0 = float(numbers[0]), float(numbers[1])
        except ValueError:
            return f"{round(x)}, {round(y)}"
        return ", ".join(str(round(v)) for v in (min(x0, x), min(y0, y), max(x0, x), max(y0, y)))
    return f"{round(x)}, {round(y)}"


def shown_size(image) -> tuple[int, int]:
    """The size a browser shows an image at (a PIL image, header read): its EXIF orientation applied, as decoding does."""
    try:
        turned = image.getexif().get(0x0112) in (5, 6, 7, 8)  # orientations that swap width and height
    except Exception:  # noqa: BLE001 - an unreadable EXIF block: shown as stored
        turned = False
    return (image.height, image.width) if turned else image.size


def scale_box(box: Sequence[float], from_size: tuple[int, int], to_size: tuple[int, int]) -> tuple[float, ...]:
    """A box in an image of ``from_size`` in the pixels of the same image at ``to_size``."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _answer_component(num_top_classes: int):
    """``gr.Label`` whose headline can be a sentence ("Not reliable", "benign or malignant: cannot
    tell", "Cannot tell"); its bars are drawn only under a headlined label (an answer that is not one
    shows no bars: the scores are in the line under it, said not to be an answer)."""
    import gradio as gr
    from gradio.components.label import LabelConfidence, LabelData

    class AnswerLabel(gr.Label):
        is_template = True  # render with gr.Label's front end

        def postprocess(self, value):
            if isinstance(value, dict) and "headline" in value:
                ranked = sorted((value.get("confidences") or {}).items(), key=lambda kv: kv[1], reverse=True)
                return LabelData(label=str(value["headline"]), confidences=[LabelConfidence(label=k, confidence=v) for k, v in ranked] or None)
            return super().postprocess(value)

    return AnswerLabel(num_top_classes=num_top_classes, label="Answer")


def _upload_component():
    """``gr.Image`` that hands the upload's path to our own decoder, so that every bad file gets a
    readable message (gradio's own preprocessing would fail with a bare "Error")."""
    import gradio as gr

    class UploadImage(gr.Image):
        is_template = True  # render with gr.Image's front end

        def preprocess(self, payload):
            # An uploaded file's path as it is: the app's own decoder (preprocess.open_image) checks the
            # declared size before decoding and names every problem; gradio's would open it first.
            if payload is not None and getattr(payload, "path", None) and not (payload.url or "").startswith("data:"):
                return payload.path
            try:
                return super().preprocess(payload)
            except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's problem
                name = safe_name(getattr(payload, "orig_name", None) or "upload")
                raise gr.Error(f"{name}: not an image that can be read ({type(exc).__name__}).", print_exception=False) from None

    return UploadImage(
        type="filepath", image_mode=None, sources=["upload", "clipboard", "webcam"],
        label="Ultrasound image", height=360, elem_classes=["upload-frame"],
    )


def _slider_component():
    """``gr.ImageSlider`` (original | Grad-CAM, display-sized JPEGs) whose images reach gradio's
    cache through :func:`cache_image`."""
    import gradio as gr

    class DisplaySlider(gr.ImageSlider):
        is_template = True  # render with gr.ImageSlider's front end

        def postprocess(self, value):
            if value is None:
                return None
            return super().postprocess(tuple(cache_image(v, self.GRADIO_CACHE, self.format) if isinstance(v, np.ndarray) else v for v in value))

    # JPEG: encoded in a few ms (PNG took ~50 ms a half at 560 x 360), and the "Original" half is
    # a display copy, not the upload's pixels.
    return DisplaySlider(label="Original | Grad-CAM", format="jpeg", type="numpy")


def _interval(m: Mapping) -> str:
    return f"{m['value']:.2f} [{m['ci'][0]:.2f}, {m['ci'][1]:.2f}]" if not math.isnan(m["value"]) else "n/a"


def metrics_markdown(info: Mapping, reliability=None) -> str:
    """The key test metrics from a model's ``metrics.json`` (its card's numbers), each saying where it
    holds, and how answers are decided (from ``reliability``: the folder's regimes)."""
    split = info.get("split")
    test = info.get(split) if split else None
    if not test:
        return "_No evaluation found for this model._"
    recall = ", ".join(f"{label} {v['recall']:.2f}" for label, v in test.get("per_class", {}).items())
    data = info.get("data", {})
    sources = list(data.get("sources") or {}) or [Path(data.get("data_dir", "")).name or "unknown data"]
    text = (
        f"**In-source evaluation** (held-out {split} images of the sources it was trained on: {', '.join(sources)}; n = {info.get('n')}), "
        f"95% intervals: macro ROC AUC {_interval(test['roc_auc'])}, balanced accuracy {_interval(test['balanced_accuracy'])}, "
        f"accuracy {_interval(test['accuracy'])}. Recall per class: {recall}. "
        f"Initialisation: {info.get('init', '?')}."
    )
    loso = info.get("leave_one_source_out")
    if loso:
        rows = [f"{name} (trained on {'+'.join(r['trained_on'])}): macro ROC AUC {_interval(r['metrics']['roc_auc'])}"
                for name, r in loso["held_out"].items()]
        text += "\n\n**On a source it never saw** (leave-one-source-out): " + "; ".join(rows) + "."
    else:
        text += "\n\n**Not measured on any unseen source**: on images from another hospital or scanner it may do much worse."
    if reliability is not None:
        from .answer_text import rule_lines

        text += "\n\n**When it states a label**\n\n" + "\n".join(f"- {line}" for line in rule_lines(info, reliability.regimes))
    return text


def answer(result) -> tuple[dict, str]:
    """What the page headlines for one prediction, and the line under it (the one rule,
    :mod:`~thyroid_classifier.answer_rule`, decided both; the reason's numbers come from the model's folder).

    Only a headlined answer carries its bars; any other shows its headline ("Not reliable", "A or B:
    cannot tell", "Cannot tell") and, in the line under it, the scores, said not to be an answer."""
    if result.headlined:
        return {"headline": result.headline, "confidences": dict(result.probabilities)}, f"**{result.reason}**"
    scores = ", ".join(f"{label} {p:.0%}" for label, p in sorted(result.probabilities.items(), key=lambda kv: kv[1], reverse=True))
    return {"headline": result.headline, "confidences": None}, f"**{result.reason}**\n\n_The model's scores, not an answer: {scores}._"


def details(result) -> dict:
    """The answer as data (the API's last output): what the page shows, and why."""
    return {"answer": result.headline, "headlined": result.headlined, "reason": result.reason, "prediction_set": result.prediction_set,
            "flagged": result.flagged, "in_domain_score": result.in_domain_score, "regime": result.regime,
            "scores": dict(result.probabilities), "explained": result.explained, "descriptors": result.descriptors,
            # where the descriptors were read: the box given, or the one the model located (None: the whole frame)
            "nodule_box": list(result.nodule_box) if result.nodule_box is not None else None}


def source_choices(predictor) -> list[tuple[str, str]]:
    """The "where is this frame from?" choices: any other source (the default), or one of the model's own."""
    return [("Another hospital or scanner, or not sure", UNSEEN)] + [(f"{name} (one of its training sources)", name) for name in predictor.training_sources]


def build_demo(predictors: Mapping, examples: Sequence[str] = (), runner: ModelRunner | None = None, forget_uploads_after: float = FORGET_UPLOAD_AFTER,
               cache_cleanup: tuple[int, int] = CACHE_CLEANUP, budget: MemoryBudget | None = None):
    """The page around one or more :class:`~thyroid_classifier.predict.Predictor` (name → predictor).

    Uploads are deleted ``forget_uploads_after`` seconds after they are read; gradio's clean-up
    removes every other file of the app (rejected or never-analysed uploads, images shown back)
    older than ``cache_cleanup[1]`` seconds, every ``cache_cleanup[0]`` seconds. Predictions run on
    ``runner`` (default: one model thread, batches of up to :data:`~thyroid_classifier.serving.MAX_BATCH`);
    pass the runner that loaded the predictors, so that one thread does all of a model's work. Up to
    :data:`IN_FLIGHT` requests are worked on at once; what their images cost together is bounded by
    ``budget`` (default: a :class:`~thyroid_classifier.serving.MemoryBudget` of
    :data:`~thyroid_classifier.serving.IMAGE_BUDGET` bytes), shared by all of them."""
    import gradio as gr

    if not predictors:
        raise ValueError("build_demo needs at least one model")
    runner = runner or ModelRunner()
    budget = budget or MemoryBudget()
    background = BackgroundWorker()  # large uploads are decoded here, at a lower priority than the model and ordinary frames
    idle = GiveBackWhenIdle()  # after a burst, what gradio's threads freed goes back to the system
    names = list(predictors)
    janitor = UploadJanitor(forget_uploads_after)

    def kept_examples() -> set:
        # gradio keeps the examples' cached copies (keep_in_cache); clicking one sends that path.
        return set().union(*(getattr(block, "keep_in_cache", set()) for block in demo.blocks.values()))

    def fail(message: str):
        # print_exception=False: gradio would print a traceback ending in the file name to the log.
        return gr.Error(message, print_exception=False)

    def predict(path: str | None, model_name: str, opacity: float, source: str | None = UNSEEN, nodule: str | None = "", kept: dict | None = None):
        with idle.request():
            return analyse(path, model_name, opacity, source, nodule, kept)

    def analyse(path: str | None, model_name: str, opacity: float, source: str | None, nodule: str | None, kept: dict | None):
        if not path:
            raise fail("Upload an image first.")
        name = safe_name(Path(path).name)
        notes: list[str] = []
        try:
            box = parse_nodule_box(nodule)
        except ValueError as exc:
            raise fail(f"Nodule box: {exc}.") from None
        try:
            predictor = predictors[model_name]
            upload_size = None
            try:
                # Opened at once, before any wait: what this request reads can no longer be deleted from under it
                # (by the upload clock, gradio's clean-up, or an identical upload that replaced the shared file).
                upload = open(path, "rb")  # noqa: SIM115 - closed by the with block below
            except FileNotFoundError:
                # The upload was deleted after it was read; this session still holds its display-sized copy (the frame
                # itself when it was no larger): analyse that again rather than ask for the upload.
                if not (kept and kept.get("upload") == path):
                    raise fail(f"{name}: the upload has expired (uploads are deleted within two minutes); upload it again.") from None
                upload = contextlib.nullcontext(_as_image(kept["original"]))
                upload_size = tuple(kept.get("size") or _as_image(kept["original"]).size)
                if kept.get("reduced"):
                    notes.append("Analysed again from this page's reduced copy (the upload is deleted); upload the frame again for the full-size analysis.")
            else:
                if path not in kept_examples():  # an example's cached copy serves every visitor
                    janitor.forget_later(path, os.fstat(upload.fileno()))  # the upload is not kept
            with upload as frame:
                try:
                    predictor.reliability.regime_for(source)  # the one check of a said source, before any work
                except ValueError:
                    raise fail(f"{safe_name(str(source))} is not one of this model's training sources; choose another hospital or scanner.") from None
                pending = probe_image(frame, name=name)  # the header only: a bomb is refused before it costs anything
                upload_size = upload_size or shown_size(pending.image)  # a nodule box's pixels: the upload's, as the page showed it
                with budget.hold(pending.cost) as held:
                    image = background.run(pending.decode) if pending.factor > 1 else pending.decode()
                    held.resize(image.width * image.height * WORKING_BYTES_PER_PIXEL)
                    # The map is computed on the image as decoded; the overlay is drawn at display size below.
                    nodule_box = scale_box(box, upload_size, image.size) if box else None
                    if nodule_box:
                        try:
                            nodule_square(nodule_box, image.size)
                        except ValueError as exc:
                            raise fail(f"Nodule box: {exc}.") from None
                    result = runner.predict(predictor, image, each={"nodule_boxes": nodule_box} if nodule_box else None, opacity=None, source=source or UNSEEN)
                    # Kept per browser session, at display size (uint8 map): the opacity control, and "Analyse" again once the upload is deleted.
                    state = {**display_state(image, result.heatmap), "upload": path, "reduced": max(image.size) > DISPLAY_SIDE, "size": upload_size}
                    if result.nodule_box is not None:  # drawn where the descriptors were read: the box given, or the one the model located
                        state["nodule"] = scale_box(result.nodule_box, image.size, state["original"].shape[1::-1])
        except ImageError as exc:
            raise fail(str(exc)) from None
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - never a stack trace in the page
            logger.error("prediction failed: %s", type(exc).__name__)  # no image data, no file name in logs
            raise fail("Something went wrong while analysing this image. It is deleted from the server within two minutes.") from None
        notes += list(result.warnings)
        for note in notes:
            gr.Warning(note)
        value, headline = answer(result)
        message = (
            f"{headline}\n\nThe heatmap shows the regions that raised the score of *{result.explained}*."
            + ("\n\n" + "\n".join(descriptor_lines(result.descriptors, descriptor_facts(predictor.info, predictor.descriptors.facts) or {}, result.flagged, result.regime)) if result.descriptors else "")
            + ("\n\n" + "\n".join(f"⚠️ {n}" for n in notes) if notes else "")
        )
        return value, blended(state, opacity), message, state, details(result)

    def click_corner(text, evt):
        return next_corner(text, *evt.index[:2])

    # gradio hands the click (gr.SelectData) to the parameter annotated with it, read with typing.get_type_hints: real
    # objects here, as this module's postponed string annotations ("gr.SelectData") do not resolve outside this function.
    click_corner.__annotations__ = {"text": str | None, "evt": gr.SelectData, "return": str}

    def reblend(state: dict | None, opacity: float):
        if not state:  # a session with no result (or a direct call): nothing to redraw
            return gr.skip()
        with budget.hold(state["heatmap"].size * 30):  # the blend's float maps and colours: ~30 bytes a pixel
            return blended(state, opacity)

    with gr.Blocks(title="Thyroid ultrasound classifier (research)", delete_cache=tuple(cache_cleanup)) as demo:
        gr.Markdown("# Thyroid ultrasound classifier")
        header = gr.Markdown(notice(predictors[names[0]].info))
        with gr.Row():
            with gr.Column():
                image = _upload_component()
                model = gr.Dropdown(names, value=names[0], label="Model", visible=len(names) > 1)
                source = gr.Dropdown(source_choices(predictors[names[0]]), value=UNSEEN, label="Where is this frame from?",
                                     info="Only a frame from one of the model's own training sources gets its in-source answers.")
                nodule = gr.Textbox("", label="Nodule box (optional)", placeholder="click two opposite corners of the nodule on the image",
                                    info="The TI-RADS descriptors are then read from the nodule (left, top, right, bottom in the image's pixels; "
                                         "empty: from the whole frame). The class and the heatmap always read the whole frame.",
                                    visible=predictors[names[0]].descriptors is not None)
                opacity = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Heatmap opacity")
                button = gr.Button("Analyse", variant="primary")
                if examples:
                    gr.Examples(list(examples), inputs=[image], label="Examples (synthetic unless stated)")
            with gr.Column():
                label = _answer_component(max(len(p.labels) for p in predictors.values()))
                slider = _slider_component()
                message = gr.Markdown()
                with gr.Accordion("The answer as data (what the API returns)", open=False):
                    data = gr.JSON(label="Answer details")
                card = gr.Markdown(metrics_markdown(predictors[names[0]].info, predictors[names[0]].reliability))
        state = gr.State(time_to_live=600)  # forgotten after 10 minutes: memory stays bounded
        # One concurrency limit and one memory budget shared by every event that touches images: the opacity
        # control waits its turn like a prediction, so no one can bypass either by calling it directly.
        slot = dict(concurrency_limit=IN_FLIGHT, concurrency_id="images")
        button.click(predict, [image, model, opacity, source, nodule, state], [label, slider, message, state, data], api_name="predict", **slot)
        # A click on the image: a corner of the nodule's box (gradio gives it in the image's own pixels). A new image: no box yet.
        image.select(click_corner, [nodule], [nodule], api_name=False, queue=False)
        image.change(lambda: "", None, [nodule], api_name=False, queue=False)
        opacity.release(reblend, [state, opacity], [slider], api_name=False, **slot)
        model.change(lambda name: (metrics_markdown(predictors[name].info, predictors[name].reliability), notice(predictors[name].info),
                                   gr.Dropdown(choices=source_choices(predictors[name]), value=UNSEEN),
                                   gr.Textbox(visible=predictors[name].descriptors is not None)), [model], [card, header, source, nodule], api_name=False)
    with _environment_defaults(QUEUE_ANALYTICS):  # read when the queue is made
        demo.queue(default_concurrency_limit=IN_FLIGHT, max_size=QUEUE_SIZE)
    return demo


@contextlib.contextmanager
def _environment_defaults(values: Mapping[str, str]) -> Iterator[None]:
    """Within the block, environment variables that are not set take ``values``; then they are unset again."""
    added = [name for name in values if name not in os.environ]
    os.environ.update({name: values[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _as_image(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array)


def load_predictors(models: Sequence[str]) -> dict:
    from .predict import Predictor

    predictors = {}
    for source in models:
        predictor = Predictor.from_pretrained(source)
        name = Path(source.rstrip("/")).name if Path(source).is_dir() else source
        predictors[name] = predictor
    return predictors


def default_examples() -> list[str]:
    """Synthetic frames drawn apart from the built-in sample (a model trained on it never saw them)."""
    from .sample import example_frames

    return [str(path) for path in example_frames()]


def launch(demo, host: str, port: int | None, share: bool, **kwargs):
    """Launch; a share link that cannot be made is reported and the local app keeps running."""
    # No run history in the browser (it would keep a thumbnail of each upload), no /monitoring dashboard.
    # max_threads: every request in flight has a thread of its own (gradio's default, 40, would hold some back in the queue).
    common = dict(server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE, quiet=True, run_history=False, enable_monitoring=False,
                  footer_links=["api", "settings"], max_threads=IN_FLIGHT + 8, css=PAGE_CSS, **kwargs)
    if share:
        try:
            result = demo.launch(share=True, **common)
            if not demo.share_url:  # gradio reports the failure and keeps serving locally
                print("Could not create a share link; the app runs locally only.", file=sys.stderr)
            return result
        except Exception as exc:  # noqa: BLE001 - no tunnel here (offline, firewalled)
            print(f"Could not create a share link ({type(exc).__name__}: {exc}); the app runs locally only.", file=sys.stderr)
            demo.close()
    return demo.launch(share=False, **common)


def _at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1 (0 model threads or batches would serve nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; defaults follow the environment a Space (or ``gradio app.py``) sets:
    ``MODEL_ID`` (model folders or Hub ids, space-separated), ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``.
    Locally, with none set, the app binds 127.0.0.1 only."""
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="Serve trained thyroid ultrasound classifiers with Grad-CAM in a web page (research use only).",
    )
    models = os.environ.get("MODEL_ID", "").split() or list(DEFAULT_MODELS)
    port = os.environ.get("GRADIO_SERVER_PORT")
    parser.add_argument("--model", nargs="+", default=models, help="model folders written by train.py or Hub ids (several: side by side; default: $MODEL_ID or the quick start's)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to bind (default: $GRADIO_SERVER_NAME or 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=int(port) if port else None, help="port (default: $GRADIO_SERVER_PORT or the first free one from 7860)")
    parser.add_argument("--share", action="store_true", help="also make a public share link")
    parser.add_argument("--concurrency", type=_at_least_one, default=1, help="model threads, each running one forward pass at a time (1 suits a 2-core CPU)")
    parser.add_argument("--max_batch", type=_at_least_one, default=MAX_BATCH, help="requests one forward pass may serve: those that wait while the model is busy go through together")
    parser.add_argument("--examples", nargs="*", default=None, help="example images (default: the built-in synthetic sample)")
    return parser.parse_args(argv)


def demo_from_arguments(args: argparse.Namespace):
    """Load the models named by ``args`` and build the page; a clear error (SystemExit 2) when a model is missing."""
    for name in args.model:
        if not Path(name).exists() and name in DEFAULT_MODELS:
            print(f"error: no model at {name}. Train one first (see the README's quick start), pass --model FOLDER_OR_HUB_ID "
                  "or set MODEL_ID.", file=sys.stderr)
            raise SystemExit(2)
    runner = ModelRunner(args.concurrency, args.max_batch)
    try:
        predictors = runner.run(load_predictors, args.model)  # loaded on the thread that runs them
    except Exception as exc:  # noqa: BLE001 - one clear line, not a stack trace
        print(f"error: cannot load a model: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    examples = args.examples if args.examples is not None else default_examples()
    # This server's files in a folder of its own (gradio reads it when the page is built and launched).
    logger.info("this server's files: %s", private_file_folder())
    return build_demo(predictors, examples=examples, runner=runner)


def module_demo():
    """The module-level ``demo`` of the top-level ``app.py`` for ``gradio app.py`` (its reload
    mode imports the file and serves ``demo``): the models from ``MODEL_ID`` or the default folder."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return demo_from_arguments(parse_args([]))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # request lines would name upload files
    try:
        demo = demo_from_arguments(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    launch(demo, args.host, args.port, args.share, prevent_thread_lock=True)
    print(f"Running on http://{args.host}:{demo.server_port} (Ctrl+C to stop)")
    demo.block_thread()
    return 0
