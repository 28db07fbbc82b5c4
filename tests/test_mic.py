"""`edgetag listen` end to end through a real microphone stack: a private PulseAudio server with a
null sink (../shared/vmic), audio played into it with paplay, recorded by sounddevice/PortAudio."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, data_path
from test_stream import detector, scene  # noqa: F401  (fixtures)

from edgetag import load_model

VMIC = REPO.parent / "shared" / "vmic"
pytestmark = [
    pytest.mark.mic,
    pytest.mark.skipif(not (VMIC / "up.sh").is_file(), reason=f"no virtual microphone scripts at {VMIC}"),
    pytest.mark.skipif(not all(shutil.which(tool) for tool in ("pulseaudio", "paplay", "pactl")),
                       reason="needs pulseaudio, pulseaudio-utils (apt-get install pulseaudio pulseaudio-utils libasound2-plugins)"),
]


def listen_while_playing(model, clip, seconds: float, tmp_path) -> list[dict]:
    """Start the virtual microphone, run `listen --json` on it (`model` None: the bundled one),
    play `clip` into it once the capture stream exists, and stop only what this test started."""
    script = f"""
    export VMIC_DIR={tmp_path / 'vmic'}
    . {VMIC / 'up.sh'}
    {sys.executable} -m edgetag listen {f"--model {model}" if model else ""} --duration {seconds} --json > {tmp_path / 'out.jsonl'} 2> {tmp_path / 'err.txt'} &
    P=$!
    i=0
    until [ "$(pactl list short source-outputs | wc -l)" -ge 2 ]; do
        i=$((i+1)); if [ $i -gt 600 ]; then echo "listen never opened the microphone" >&2; kill $P; break; fi; sleep 0.05
    done
    paplay --device=vmic_sink {clip}
    wait $P
    rc=$?
    . {VMIC / 'down.sh'}
    exit $rc
    """
    run = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=seconds + 60,
                         env={k: v for k, v in os.environ.items() if not k.startswith("PULSE")})
    err = (tmp_path / "err.txt").read_text() if (tmp_path / "err.txt").exists() else ""
    assert run.returncode == 0, run.stderr + err
    return [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]


def test_real_clip_reaches_the_engine(detector, tmp_path):  # noqa: F811
    clip = data_path("esc50/audio/4-183992-A-0.flac")  # a barking dog, 5 s
    rows = listen_while_playing(detector, clip, 7.0, tmp_path)
    summary = rows[-1]
    assert summary["kind"] == "summary" and summary["seconds"] == pytest.approx(7.0, abs=0.05)
    assert summary["peak_dbfs"] > -30  # the dog came through, not just the null sink's silence
    assert summary["hops"] == 1 + int((7.0 - 0.495) / 0.25 + 1e-9) and summary["overflows"] == 0  # 0.495 s windows every 0.25 s
    for row in rows[:-1]:
        assert set(row) == {"file", "kind", "label", "start", "end", "score", "model", "time"} and row["file"].startswith("mic:")


def test_live_events_equal_file_events_within_one_hop(detector, scene, tmp_path):  # noqa: F811
    live = [r for r in listen_while_playing(detector, scene, 9.0, tmp_path)[:-1] if r["label"] in ("tone", "noise")]
    run = subprocess.run([sys.executable, "-m", "edgetag", "file", str(scene), "--model", str(detector), "--json"], cwd=REPO, capture_output=True, text=True)
    offline = [json.loads(line) for line in run.stdout.splitlines()]
    offline = [r for r in offline if r["label"] in ("tone", "noise")]
    long = lambda rows: [r for r in rows if r["end"] - r["start"] > 0.75]  # noqa: E731
    live, offline = long(live), long(offline)
    assert [r["label"] for r in live] == [r["label"] for r in offline] == ["tone", "noise"]
    lead_in = live[0]["start"] - offline[0]["start"]  # the microphone was open before the clip began
    assert 0 <= lead_in < 3
    for a, b in zip(live, offline):
        assert abs(a["start"] - lead_in - b["start"]) <= 0.25 + 1e-6
        assert abs(a["end"] - lead_in - b["end"]) <= 0.25 + 1e-6


def test_bundled_model_hears_the_example_through_the_microphone(tmp_path):
    """The quick start's clip, played into the microphone: `edgetag listen` without --model runs the
    bundled model and hears what `edgetag file` hears. The live hop grid has its own phase against
    the clip, and the scores may sit near their thresholds (edgetag-default-4's "yes" peaked at
    0.96-0.995 over ten phases against a threshold of 0.99), so live may miss the word but must
    hear no other, and the two must share a tag."""
    example = REPO / "edgetag" / "assets" / "example.flac"
    live = listen_while_playing(None, example, 10.0, tmp_path)[:-1]
    run = subprocess.run([sys.executable, "-m", "edgetag", "file", str(example), "--json"], cwd=REPO, capture_output=True, text=True)
    offline = [json.loads(line) for line in run.stdout.splitlines()]
    labels = lambda rows, kind: [r["label"] for r in rows if r["kind"] == kind]  # noqa: E731
    assert {r["model"] for r in live} == {r["model"] for r in offline} == {load_model().spec.model_id}
    assert set(labels(live, "keyword")) <= set(labels(offline, "keyword")) == {"yes"}
    assert set(labels(live, "tag")) & set(labels(offline, "tag"))


def test_devices_lists_the_microphone_and_listen_finds_it_by_index_and_by_name(tmp_path):
    """`edgetag devices` on the virtual microphone's stack, then `listen --device` with an index and
    a name from that list, and a device that is not there: one line, exit 2."""
    script = f"""
    export VMIC_DIR={tmp_path / 'vmic'}
    . {VMIC / 'up.sh'} > /dev/null
    {sys.executable} -m edgetag devices > {tmp_path / 'devices.txt'}
    for device in $(awk '{{print $(NF-5)}}' {tmp_path / 'devices.txt'} | head -1) $(awk '{{print $(NF-4)}}' {tmp_path / 'devices.txt'} | head -1) nosuch; do
        {sys.executable} -m edgetag listen --device $device --duration 0.6 --json > {tmp_path}/listen_$device.jsonl 2> {tmp_path}/listen_$device.err
        echo "$device $?" >> {tmp_path / 'codes.txt'}
    done
    . {VMIC / 'down.sh'} > /dev/null
    """
    subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                   env={k: v for k, v in os.environ.items() if not k.startswith("PULSE")})
    rows = [line.split() for line in (tmp_path / "devices.txt").read_text().splitlines()]
    assert rows and all(r[-4].startswith("(") and r[-3] == "ch," and r[-1] == "Hz)" for r in rows)  # index  name  (N ch, R Hz)
    assert sum(line.startswith("*") for line in (tmp_path / "devices.txt").read_text().splitlines()) == 1  # one default
    codes = dict(line.split() for line in (tmp_path / "codes.txt").read_text().splitlines())
    index, name = rows[0][-6], rows[0][-5]
    assert codes == {index: "0", name: "0", "nosuch": "2"}
    for device in (index, name):
        summary = json.loads((tmp_path / f"listen_{device}.jsonl").read_text().splitlines()[-1])
        assert summary["kind"] == "summary" and summary["seconds"] == pytest.approx(0.6, abs=0.05)
    assert (tmp_path / "listen_nosuch.err").read_text().strip() == "edgetag: error: no input device matches 'nosuch' (see `edgetag devices`)"


def test_microphone_counts_what_it_drops_and_what_portaudio_overflows(tmp_path):
    """A consumer that stops reading loses blocks, counted, while the queue keeps the oldest ones
    (PortAudio's callback never blocks); an input-overflow flag from PortAudio is counted once."""
    probe = """
import json, time
import numpy as np, sounddevice as sd
from edgetag.audio import Microphone
with Microphone(None, block_seconds=0.1, queue_seconds=0.3) as mic:  # a queue of 3 blocks
    time.sleep(2.0)  # ~20 blocks arrive, nobody reads
    dropped = mic.dropped
    queued = mic.queue.qsize()
    overflows = mic.overflows
    mic._callback(np.zeros((1600, 1), np.float32), 1600, None, sd.CallbackFlags(0x2))  # paInputOverflow
    print(json.dumps({"dropped": dropped, "queued": queued, "overflows": overflows, "after": mic.overflows}))
"""
    (tmp_path / "probe.py").write_text(probe)
    script = f"""
    export VMIC_DIR={tmp_path / 'vmic'}
    . {VMIC / 'up.sh'} > /dev/null
    {sys.executable} {tmp_path / 'probe.py'} > {tmp_path / 'out.json'} 2> {tmp_path / 'err.txt'}
    rc=$?
    . {VMIC / 'down.sh'} > /dev/null
    exit $rc
    """
    run = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if not k.startswith("PULSE")})
    assert run.returncode == 0, run.stderr + (tmp_path / "err.txt").read_text()
    seen = json.loads((tmp_path / "out.json").read_text())
    assert seen["queued"] == 3
    assert seen["dropped"] >= 10  # 2 s at 10 blocks/s, less the 3 kept and a slow start
    assert seen["after"] == seen["overflows"] + 1


def test_a_microphone_that_goes_away_ends_listen_with_one_line_and_exit_2(tmp_path):
    """The sound server killed mid-session: after 5 s without any audio, listen prints its summary
    and one error line naming the device, and exits 2 (PortAudio adds its own C-level lines)."""
    script = f"""
    export VMIC_DIR={tmp_path / 'vmic'}
    . {VMIC / 'up.sh'}
    {sys.executable} -m edgetag listen --json > {tmp_path / 'out.jsonl'} 2> {tmp_path / 'err.txt'} &
    P=$!
    i=0
    until [ "$(pactl list short source-outputs | wc -l)" -ge 2 ]; do
        i=$((i+1)); if [ $i -gt 600 ]; then echo "listen never opened the microphone" >&2; kill $P; break; fi; sleep 0.05
    done
    sleep 1
    kill $(cat $VMIC_DIR/pulse.pid) $(cat $VMIC_DIR/keepalive.pid)
    wait $P
    rc=$?
    . {VMIC / 'down.sh'}
    exit $rc
    """
    run = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=90,
                         env={k: v for k, v in os.environ.items() if not k.startswith("PULSE")})
    err = (tmp_path / "err.txt").read_text()
    ours = [line for line in err.splitlines() if line.startswith("edgetag")]
    assert run.returncode == 2 and "Traceback" not in err, err
    assert len(ours) == 1 and ours[0].endswith("no audio for 5 s; the device went away"), err
    assert json.loads((tmp_path / "out.jsonl").read_text().splitlines()[-1])["kind"] == "summary"
