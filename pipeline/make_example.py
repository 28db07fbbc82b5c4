"""Rebuild the bundled example clip edgetag/assets/example.flac from ../shared/data.

A dog barking (ESC-10, CC BY 3.0) followed by a spoken "yes" (Speech Commands, CC BY 4.0);
attribution in edgetag/assets/NOTICE. Neither was trained on: the dog is from ESC-50 fold 4 (the
tags' validation fold) and the speaker is in the keywords' validation split (the first "yes"
clip of that split, by name), so the quick start shows the bundled model on unseen audio.

    python -m pipeline.make_example [--data ../shared/data]
"""

from pathlib import Path

import numpy as np
import typer

from edgetag import audio

DOG = "esc50/audio/4-183992-A-0.flac"
YES = "speech_commands/yes/26b28ea7_nohash_0.flac"
OUT = Path(__file__).resolve().parents[1] / "edgetag" / "assets" / "example.flac"


def main(data: Path = typer.Option(Path("../shared/data"), help="The shared data folder.")) -> None:
    import soundfile as sf

    rate = audio.SAMPLE_RATE
    gap = np.zeros(rate // 2, np.float32)
    clip = np.concatenate([audio.load(data / DOG), gap, audio.load(data / YES), gap])
    sf.write(OUT, clip, rate, subtype="PCM_16")
    print(f"{OUT}: {len(clip) / rate:.2f} s")


if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
