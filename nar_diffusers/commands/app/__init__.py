"""`nar-diffusers app --model FOLDER`: a local Gradio app that shows a NAR model painting, plane by plane.

    pip install "nar-diffusers[app]"
    nar-diffusers app --model nar-demo/pipeline              # prints http://127.0.0.1:<free port>

Tabs:

- **Generate** (image models): a class (by name when the model has names) or a prompt, the sampling controls (set to
  the model's saved `sampling_defaults`), and the image streamed after every forward pass: NAR grows it from the
  top-left corner, one anti-diagonal of tokens per pass; cells not generated yet are gray.
- **Inpaint / outpaint** (image models): upload an image, paint the region to regenerate (or pick one: bottom half,
  right half, ...; or an outpainting layout that shrinks the image into a corner of the canvas), and watch the rest
  grow around the kept tokens (`NARInpaintPipeline`).
- **Generate video** (video models): the clip streamed as a strip of frames, then an animated GIF; with a frame-wise
  tokenizer, optionally continuing the first frames of an uploaded video.

The app runs on this machine only: it binds to 127.0.0.1 unless `--host` says otherwise, never creates a public
share link, turns Gradio's analytics off and loads no fonts or scripts from the internet, so it works offline. Every
action is also an API endpoint (`/generate`, `/inpaint`, `/generate_video`), e.g. for `gradio_client`. What a
request may upload or ask for is bounded (`--max-upload-bytes`, `--max-pixels`, `--max-frames`, `--max-images`:
`nar_diffusers.utils.request_limits.RequestLimits`), checked before anything is decoded; uploads are removed after
each request, and messages to a client show no server path.

Modules: `models` (the loaded folder's pipelines), `handlers` (what each button runs, streaming previews),
`layout` (one function per tab), `launch` (the flags and the local server).
"""

from .handlers import INPAINT_REGIONS, inpaint_inputs, stream_generation
from .launch import add_arguments, free_port, launch_app, run
from .layout import CSS, DISPLAY_SIZE, MAX_IMAGES, build_app
from .models import INSTALL_HINT, AppModels, import_gradio, load_app_pipeline

__all__ = [
    "CSS",
    "DISPLAY_SIZE",
    "INPAINT_REGIONS",
    "INSTALL_HINT",
    "MAX_IMAGES",
    "AppModels",
    "add_arguments",
    "build_app",
    "free_port",
    "import_gradio",
    "inpaint_inputs",
    "launch_app",
    "load_app_pipeline",
    "run",
    "stream_generation",
]
