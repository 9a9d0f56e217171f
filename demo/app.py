"""The Gradio page: a picture and a question in, the full and the reduced model's answers side by side out.

Safe defaults (see the README's *Demo*): binds to 127.0.0.1; uploads go through :func:`samples.read_upload` (only
the uploaded file is read, over :data:`samples.MAX_IMAGE_PIXELS` or not an image -> a message in the page);
Gradio's queue runs at most :data:`MODEL_CONCURRENCY` comparison at a time (``vlmdrop.apply`` changes the model in
place, so one model serves one comparison at a time), other users wait in the queue (at most
:data:`QUEUE_SIZE`) and see their position; uploads are limited to :data:`MAX_FILE_SIZE`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator

from .backend import Answer, DemoBackend, method_choices
from .layout import bar_chart, kept_picture, token_layout
from .samples import MAX_IMAGE_PIXELS, ImageError, Sample, load_samples, read_upload

log = logging.getLogger(__name__)

__all__ = ["MAX_FILE_SIZE", "MODEL_CONCURRENCY", "QUEUE_SIZE", "build_app", "comparison_updates", "launch"]

#: Comparisons that run at once (Gradio's ``concurrency_limit`` of the Submit event): the model is changed in
#: place by ``vlmdrop.apply`` while the reduced answer is generated, so one at a time.
MODEL_CONCURRENCY = 1
#: Requests that may wait in Gradio's queue; more are turned away with "queue full".
QUEUE_SIZE = 32
#: Largest upload Gradio accepts (its ``max_file_size``).
MAX_FILE_SIZE = "25mb"


def _fmt_answer(a: Answer, *, full: bool) -> str:
    if not a.done:
        return "generating ..." if (full or a.text) else "waiting for the full model ..."
    ttft = "n/a" if a.ttft is None else f"{a.ttft * 1000:.1f} ms"
    tps = "n/a (one token)" if a.decode_tps is None else f"{a.decode_tps:.1f} tokens/s"
    lines = [f"**time to first token** {ttft} · **decode** {tps} · {a.new_tokens} new tokens"]
    st = a.stats
    if full:
        lines.append(f"**visual tokens** {a.visual_tokens}")
    elif st is not None:
        lines.append(f"**visual tokens** {st.n_kept} of {st.n_before} ({st.n_kept / max(st.n_before, 1):.1%})"
                     + (f", {st.n_new} of them merged / pooled rows" if st.n_new else ""))
        if st.layer_tokens:
            lines.append(f"**image tokens per LLM layer** {st.layer_tokens}")
        lines.append(f"`{a.config}`")
    return "  \n".join(lines)


def _pictures(image: Any, backend: DemoBackend, red: Answer) -> tuple[Any, Any, Any, str]:
    """(kept-token picture, per-crop budget chart, per-layer chart, note) of a finished reduced answer."""
    st = red.stats
    try:
        layout = token_layout(backend.model.config, backend.processor, image.size)
    except ValueError as e:
        return None, None, None, f"No token picture for this model: {e}"
    if len(layout) != st.n_before:
        return None, None, None, (f"No token picture: the layout has {len(layout)} positions, the model used "
                                  f"{st.n_before}")
    groups = [g.tolist() for g in st.new_groups] if st.new_groups else None
    picture = kept_picture(image, layout, st.kept_indices.tolist(), groups)
    budgets = None
    if st.crop_budgets:
        caps = [sum(1 for c in layout.crop_of if c == k) for k in range(len(layout.crops))]
        budgets = bar_chart(st.crop_budgets, list(layout.crop_names), caps=caps,
                            title=f"budget per crop (grey: crop size), {sum(st.crop_budgets)} in all")
    layers = None
    if st.layer_tokens:
        layers = bar_chart(st.layer_tokens, [str(i) for i in range(len(st.layer_tokens))],
                           title="image tokens in each decoder layer")
    note = ("Bright, yellow outline: kept patches; dimmed: dropped; coloured outlines: the patches a merged or "
            "pooled row summarises (one colour per row); blue: the crop / tile grid.")
    return picture, budgets, layers, note


def comparison_updates(backend: DemoBackend, get_image: Callable[[], Any], question: str, method: str,
                       budget: float, max_new_tokens: float) -> Iterator[tuple]:
    """The *Answer* event's outputs as they change: (full answer, its stats, reduced answer, its stats, kept-token
    picture, per-crop chart, per-layer chart, note, error). A user error (``ValueError``: the image, a method's
    parameters) or a failure of the model becomes one line in the error box, never a stack trace in the page."""
    blank = ("", "", "", "", None, None, None, "")  # answers, stats, pictures, note
    try:
        image = get_image()
        if not question or not question.strip():
            raise ImageError("type a question")
        full, red = Answer(), Answer()
        for full, red in backend.compare(image, question.strip(), method, float(budget),
                                         max_new_tokens=int(max_new_tokens)):
            yield (full.text, _fmt_answer(full, full=True), red.text, _fmt_answer(red, full=False),
                   None, None, None, "", "")
        picture, budgets, layers, note = _pictures(image, backend, red)
        yield (full.text, _fmt_answer(full, full=True), red.text, _fmt_answer(red, full=False),
               picture, budgets, layers, note, "")
    except ValueError as e:  # ImageError, a method's parameter error (vlmdrop.apply), a layout error
        yield blank + (f"**Error:** {' '.join(str(e).split())}",)
    except Exception as e:  # the model failed (e.g. out of memory): logged in full, one line in the page
        log.exception("comparison failed (method %r, budget %r)", method, budget)
        yield blank + (f"**Error:** the model failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}",)


def build_app(backend: DemoBackend, *, samples: list[Sample] | None = None) -> Any:
    """The ``gradio.Blocks`` of the demo on ``backend`` (samples: :func:`samples.load_samples` by default)."""
    import gradio as gr

    samples = load_samples() if samples is None else samples
    by_label = {s.label: s for s in samples}
    choices = method_choices()
    upload_root = os.path.realpath(gr.utils.get_upload_folder())

    def pick_sample(label: str | None):
        if label is None:  # cleared by an upload: nothing to do
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        s = by_label.get(label)
        if s is None:
            return None, gr.skip(), f"**Error:** no sample called {label!r}", None, gr.skip()
        return s.image, s.question, "", ("sample", label), None  # the upload box is cleared

    def take_upload(path: str | None):
        if not path:  # cleared (by the user or by picking a sample): nothing to do
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            image = read_upload(path, upload_root=upload_root)
        except ImageError as e:  # the message stays, the upload box is emptied for the next try
            return None, f"**Error:** {e}", None, None, None
        return image, "", ("upload", path), None, gr.skip()  # the sample choice is cleared

    def current_image(source: tuple[str, str] | None):
        if source is None:
            raise ImageError("pick a sample or upload an image first")
        kind, key = source
        if kind == "sample":
            return by_label[key].image
        return read_upload(key, upload_root=upload_root)

    def run(source, question: str, method: str, budget: float, max_new: float) -> Iterator[tuple]:
        yield from comparison_updates(backend, lambda: current_image(source), question, method, budget, max_new)

    with gr.Blocks(title="vlmdrop: full vs reduced", analytics_enabled=False) as app:
        gr.Markdown("# vlmdrop — the full model and the reduced model, side by side\n"
                    "Pick a sample or upload an image, ask a question, choose a method and a budget (the share "
                    "of visual tokens left; with a stack, each method's). Runs are queued: one at a time.")
        source = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                sample = gr.Dropdown([s.label for s in samples], label="Sample", value=None, elem_id="sample")
                upload = gr.File(label=f"…or upload an image (at most {MAX_IMAGE_PIXELS:,} pixels)",
                                 type="filepath", elem_id="upload")
                preview = gr.Image(label="Picture", type="pil", interactive=False, elem_id="preview", height=260)
            with gr.Column(scale=1):
                question = gr.Textbox(label="Question", lines=2, elem_id="question")
                method = gr.Dropdown(choices, value="hired" if "hired" in choices else choices[0], label="Method",
                                     elem_id="method")
                budget = gr.Slider(0.01, 1.0, value=0.2, step=0.01, label="Budget (share of visual tokens left)",
                                   elem_id="budget")
                max_new = gr.Slider(1, 64, value=backend.max_new_tokens, step=1, label="Max new tokens",
                                    elem_id="max-new-tokens")
                submit = gr.Button("Answer", variant="primary", elem_id="submit")
        error = gr.Markdown("", elem_id="error")
        with gr.Row():
            with gr.Column():
                full_text = gr.Textbox(label="Full model", lines=3, interactive=False, elem_id="full-answer")
                full_info = gr.Markdown("", elem_id="full-stats")
            with gr.Column():
                red_text = gr.Textbox(label="Reduced model", lines=3, interactive=False, elem_id="reduced-answer")
                red_info = gr.Markdown("", elem_id="reduced-stats")
        gr.Markdown("## What was kept")
        kept = gr.Image(label="Kept tokens", type="pil", interactive=False, elem_id="kept-picture")
        note = gr.Markdown("", elem_id="kept-note")
        with gr.Row():
            budgets = gr.Image(label="Budget per crop", type="pil", interactive=False, elem_id="budget-chart")
            layers = gr.Image(label="Tokens per LLM layer", type="pil", interactive=False, elem_id="layer-chart")

        sample.change(pick_sample, sample, [preview, question, error, source, upload])
        upload.change(take_upload, upload, [preview, error, source, sample, upload])
        submit.click(run, [source, question, method, budget, max_new],
                     [full_text, full_info, red_text, red_info, kept, budgets, layers, note, error],
                     concurrency_limit=MODEL_CONCURRENCY, concurrency_id="model")
    app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=MODEL_CONCURRENCY)
    return app


def launch(*, model: str | None = None, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           dtype: str = "auto", device: str | None = None, attn_implementation: str = "sdpa",
           max_new_tokens: int = 24, block: bool = True) -> Any:
    """Load the model (None: the embedded miniature), build the page and serve it on ``host:port``.

    With ``block=False`` it returns the running ``gradio.Blocks`` (``.close()`` stops it)."""
    backend = DemoBackend.load(model, dtype=dtype, device=device, attn_implementation=attn_implementation,
                               max_new_tokens=max_new_tokens)
    backend.warm_up()
    app = build_app(backend)
    log.info("vlmdrop demo on http://%s:%s (share=%s)", host, port, share)
    app.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE, ssr_mode=False,
               prevent_thread_lock=not block, show_error=False, footer_links=[], quiet=not block)
    return app
