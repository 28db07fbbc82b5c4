"""Label vocabularies: the Speech Commands keyword task, and dataset classes named by AudioSet.

Tag labels use AudioSet display names (class_labels_indices.csv) where a class maps onto the
ontology, so one tag head can be trained on several datasets and read by people who know
AudioSet. Classes that mean the same sound in two datasets (ESC-50 "coughing", DCASE "cough")
land on one name; classes AudioSet has no node for keep their own name, made readable.
"""

from __future__ import annotations

import csv
from pathlib import Path

from edgetag.spec import SILENCE, UNKNOWN

# The 12-class Speech Commands task (Warden 2018): ten words, everything else, and no speech.
COMMAND_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
KEYWORD_LABELS = (*COMMAND_WORDS, UNKNOWN, SILENCE)

AUDIOSET_NAMES = {
    # ESC-50 categories
    "airplane": "Fixed-wing aircraft, airplane",
    "breathing": "Breathing",
    "brushing_teeth": "Toothbrush",
    "car_horn": "Vehicle horn, car horn, honking",
    "cat": "Cat",
    "chainsaw": "Chainsaw",
    "chirping_birds": "Chirp, tweet",
    "church_bells": "Church bell",
    "clapping": "Clapping",
    "clock_alarm": "Alarm clock",
    "clock_tick": "Tick-tock",
    "coughing": "Cough",
    "cow": "Cattle, bovinae",
    "crackling_fire": "Fire",
    "crickets": "Cricket",
    "crow": "Crow",
    "crying_baby": "Baby cry, infant cry",
    "dog": "Dog",
    "door_wood_creaks": "Creak",
    "door_wood_knock": "Knock",
    "engine": "Engine",
    "fireworks": "Fireworks",
    "footsteps": "Walk, footsteps",
    "frog": "Frog",
    "glass_breaking": "Shatter",
    "hand_saw": "Sawing",
    "helicopter": "Helicopter",
    "hen": "Cluck",
    "insects": "Insect",
    "keyboard_typing": "Computer keyboard",
    "laughing": "Laughter",
    "mouse_click": "Clicking",
    "pig": "Pig",
    "pouring_water": "Pour",
    "rain": "Rain",
    "rooster": "Crowing, cock-a-doodle-doo",
    "sea_waves": "Waves, surf",
    "sheep": "Sheep",
    "siren": "Siren",
    "sneezing": "Sneeze",
    "snoring": "Snoring",
    "thunderstorm": "Thunderstorm",
    "toilet_flush": "Toilet flush",
    "train": "Train",
    "vacuum_cleaner": "Vacuum cleaner",
    "water_drops": "Drip",
    "wind": "Wind",
    # DCASE 2016 task 2
    "clearthroat": "Throat clearing",
    "cough": "Cough",
    "doorslam": "Slam",
    "drawer": "Drawer open or close",
    "keyboard": "Computer keyboard",
    "keysDrop": "Keys jangling",
    "knock": "Knock",
    "laughter": "Laughter",
    "phone": "Telephone bell ringing",
    "speech": "Speech",
    # ESC-50 "can_opening", "drinking_sipping", "washing_machine" and DCASE "pageturn" have no node.
    "pageturn": "page turn",
    # UrbanSound8K (dog_bark as ESC-50's dog: both are mostly barks, and one name keeps them one class)
    "air_conditioner": "Air conditioning",
    "children_playing": "Children playing",
    "dog_bark": "Dog",
    "drilling": "Drill",
    "engine_idling": "Idling",
    "gun_shot": "Gunshot, gunfire",
    "jackhammer": "Jackhammer",
    "street_music": "Music",
}
# Dataset classes AudioSet has no node for: the tag head keeps them beside its 527 classes.
EXTRA_TAGS = ("can opening", "drinking sipping", "washing machine", "page turn")


def tag_name(label: str) -> str:
    """The AudioSet display name of a dataset class, or the class made readable."""
    return AUDIOSET_NAMES.get(label, label.replace("_", " "))


def audioset_display_names(path: Path) -> dict[str, str]:
    """mid -> display name, from AudioSet's class_labels_indices.csv."""
    with open(path, newline="") as f:
        return {row["mid"]: row["display_name"] for row in csv.DictReader(f)}


def keyword_label(word: str) -> str:
    """A Speech Commands folder name as a 12-class label."""
    return word if word in COMMAND_WORDS or word == SILENCE else UNKNOWN


def audioset_vocabulary(audioset: Path) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """The 527 AudioSet classes (class_labels_indices.csv order) and, from ontology.json, each
    class's nearest broader classes among them ("Dog" -> "Domestic animals, pets"): a node that
    is not one of the 527 is looked through to its own parents."""
    import json

    names = audioset_display_names(Path(audioset) / "class_labels_indices.csv")
    nodes = {n["id"]: n for n in json.loads((Path(audioset) / "ontology.json").read_text())}
    up: dict[str, list[str]] = {}
    for node in nodes.values():
        for child in node["child_ids"]:
            up.setdefault(child, []).append(node["id"])

    def nearest(mid: str, seen: set) -> list[str]:
        out = []
        for parent in up.get(mid, []):
            if parent not in seen:
                seen.add(parent)
                out += [parent] if parent in names else nearest(parent, seen)
        return out

    parents = {names[mid]: tuple(dict.fromkeys(names[p] for p in nearest(mid, set()))) for mid in names}
    return list(names.values()), {child: ps for child, ps in parents.items() if ps}


def columns(source: tuple[str, ...] | list[str], labels: tuple[str, ...] | list[str]) -> tuple[list[int], list[int]]:
    """(columns of `labels`, columns of `source`) of the classes both name."""
    where = {label: i for i, label in enumerate(source)}
    shared = [(i, where[label]) for i, label in enumerate(labels) if label in where]
    return [i for i, _ in shared], [j for _, j in shared]
