"""`python -m fit3d.view RUN_DIR/SCENE [--finetune RUN_DIR] [--port N]`: view a lifted scene.

Serves an interactive 3D viewer (viser) on localhost: the scene's Gaussians as splats coloured by
RGB, by a PCA of their decoded features, or by cosine similarity to a queried Gaussian; the
training cameras as frustums; a selected camera's image beside the original (and fine-tuned)
backbone's PCA feature maps. Needs no GPU and no internet; open the printed URL in a browser.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fit3d.cli import ArgumentParser
from fit3d.errors import UserError, cli_entry


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m fit3d.view", description=__doc__.splitlines()[0])
    p.add_argument("scene", help="a lifted scene folder: outputs/lift/<run>/<scene>")
    p.add_argument(
        "--finetune",
        default=None,
        help="a stage-2 run folder (outputs/finetune/<run>): adds fine-tuned feature maps",
    )
    p.add_argument("--port", type=int, default=8080, help="port on localhost (default 8080)")
    p.add_argument("--host", default="127.0.0.1", help="interface to serve on (default localhost)")
    p.add_argument(
        "--max-gaussians",
        type=int,
        default=500_000,
        help="display at most this many Gaussians, the most visible ones (default 500000)",
    )
    p.add_argument(
        "--screenshot",
        default=None,
        metavar="PNG",
        help="save a picture of the viewer (headless Chromium) to PNG and exit",
    )
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if args.max_gaussians < 1:
        raise UserError(f"--max-gaussians must be >= 1, got {args.max_gaussians}")
    if not Path(args.scene).is_dir():  # the scene's files are checked by `Viewer`
        raise UserError(f"{args.scene} is not a folder (expected outputs/lift/<run>/<scene>)")
    if args.finetune is not None and not Path(args.finetune).exists():
        raise UserError(f"no fine-tuned backbone at {args.finetune} (no such folder or file)")
    from fit3d.view.server import Viewer  # torch, viser: only for arguments that passed

    viewer = Viewer(
        args.scene,
        finetune=args.finetune,
        host=args.host,
        port=args.port,
        max_gaussians=args.max_gaussians,
    )
    try:
        print(viewer.summary)
        for note in viewer.notes:
            print(f"warning: {note}", file=sys.stderr)
        if args.screenshot:
            from fit3d.view.browser import save_viewer_picture

            print(f"saved {save_viewer_picture(viewer, args.screenshot)}")
            return 0
        print(f"fit3d.view: open {viewer.url} in a browser (Ctrl+C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        viewer.stop()


if __name__ == "__main__":
    sys.exit(main())
