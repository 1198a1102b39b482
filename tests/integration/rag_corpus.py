"""A small RAG corpus built in code: twelve made-up product manual sections on clearly
different topics, and questions whose answer is in one of them.

Half the questions use the document's own distinctive words ("direct"); the other half
describe the problem in other words ("paraphrased"), which a lexical search alone finds
less often. Common words recur across documents on purpose (battery, water, clean,
charge) so that a search has to weigh them.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from chatprocessor.core.errors import ProviderUnavailable
from chatprocessor.providers.base import Embeddings
from chatprocessor.providers.mock import MockProvider

DOCUMENTS: dict[str, str] = {
    "aurora-thermostat.md": """# Aurora X200 Smart Thermostat

## Wiring
The Aurora X200 needs a common wire (C-wire) from the HVAC control board to power its
colour display and Wi-Fi radio. Without a C-wire the thermostat steals power from the
heating circuit, and some furnaces then switch on and off every few minutes.

## Heating does not start
If the display shows HEAT ON but the room stays cold, check that the furnace breaker is on
and that the W1 terminal is seated. A blinking amber LED means the furnace safety switch
tripped. Push the reset pin hole for ten seconds to restore the factory settings.
""",
    "brewmaster-espresso.md": """# Brewmaster 9 Espresso Machine

## Descaling
Hard water leaves limescale in the boiler and the group head. Descale the Brewmaster 9
every two months: dissolve 30 g of citric acid in one litre of water, fill the tank, and run
the descaling programme by holding the steam and hot water buttons together.

## Daily care
Knock out the coffee puck after each shot, rinse the portafilter and the basket, and
purge the steam wand for two seconds so milk does not dry inside it.
""",
    "trailblazer-ebike.txt": """Trailblazer E-Bike Battery

The Trailblazer uses a 500 Wh lithium-ion battery pack mounted in the down tube. A full
charge with the supplied 4 A charger takes about five hours; the charger LED turns from red
to green when the pack is full.

On the eco assist level the range is about 110 kilometres; on turbo expect 45 kilometres.
Cold weather below zero degrees reduces the range by up to a third. Store the pack at
half charge if you will not ride for a month.
""",
    "nimbus-vacuum.md": """# Nimbus Robot Vacuum

## Docking station
The Nimbus empties its dust bin into the docking station bag after every run. Replace the
bag when the dock shows a red bag icon, roughly every six weeks.

## Stairs and drops
Four infrared cliff sensors under the bumper stop the robot at stairs and ledges. Wipe
them with a dry cloth if the Nimbus tumbles down a step or refuses to cross dark rugs.

## Brushes
Cut hair off the main roller brush weekly and replace the side brush every three months
to keep suction strong.
""",
    "harbor-kayak.md": """# Harbor Touring Kayak

## Hull repair
Small cracks in the polyethylene hull are welded with a plastic repair rod and a heat gun.
For the fiberglass model, sand the damaged area, lay two layers of cloth with epoxy resin
and let it cure for a day before paddling.

## Staying dry
A neoprene spray skirt seals the cockpit rim around your waist so waves and paddle drips
stay out of the boat. Pull the grab loop forward to release it when you capsize.
""",
    "quill-fountain-pen.txt": """Quill Fountain Pen Care

Fill the pen with the piston converter: dip the nib into the ink bottle, twist the
converter knob anticlockwise to push out the air, then clockwise to draw ink up.

When the pen skips or feels scratchy, the feed is clogged with dried ink. Flush the nib
and feed with lukewarm water and a drop of dish soap until the water runs clear, then let
it dry overnight before refilling.
""",
    "sprout-irrigation.md": """# Sprout Hub Greenhouse Irrigation

## Schedules
The Sprout Hub opens up to eight drip line valves. Create a watering schedule in the app:
pick the zone, the start time and the minutes per cycle.

## Soil moisture sensor
Plug a soil moisture probe into each zone. When the probe reads above the threshold, the
hub skips the scheduled cycle, so beds are not flooded after rain or a humid night.
""",
    "polar-sleeping-bag.txt": """Polar 800 Down Sleeping Bag

The Polar is filled with 800 fill-power goose down. Its comfort temperature rating is
minus 6 degrees Celsius and its limit rating minus 14, so it suits winter camping in snow.

Washing: use a front-loading machine on a gentle cycle with a down-specific wash, then tumble
dry on low heat with three tennis balls to break up clumps. Store it loose, never in the
compression sack.
""",
    "orion-telescope.md": """# Orion 8 Inch Reflector Telescope

## Collimation
If stars look like smeared comets even in focus, the mirrors are out of line. Collimate
with the supplied cap: turn the three secondary mirror screws until the reflection is
centred, then adjust the primary mirror knobs at the back of the tube.

## Eyepieces
The 25 mm eyepiece gives 48x magnification with the 1200 mm focal length; the 10 mm gives
120x. Start every session with the low power eyepiece to find the object.
""",
    "beacon-smoke-alarm.md": """# Beacon Smoke and Carbon Monoxide Alarm

## Chirping
A single chirp every minute means the 9 V battery is low. Replace it, then press the test
button until the alarm sounds to confirm the new battery works.

## Alarm patterns
Three long beeps mean smoke; four short beeps mean carbon monoxide. Leave the house and
call the emergency number when you hear four short beeps.
""",
    "sonata-piano.md": """# Sonata SP-88 Digital Piano

## Pedals
The damper pedal on the right sustains the notes you play; the soft pedal on the left
makes them quieter. Plug the three-pedal unit into the PEDAL jack before switching on.

## Connecting to a computer
The SP-88 sends and receives MIDI over USB: connect the USB-B port to the computer, no
driver is needed. The 256-note polyphony keeps long sustained chords from cutting out.
""",
    "vault-passwords.md": """# Vault Password Manager

## Master password
Vault never stores your master password and cannot reset it. If you forget it, open the
account with the recovery kit you printed when you signed up.

## Two-factor authentication
Enable two-factor authentication with an authenticator app. If you lose the phone, log in
with one of the ten backup codes and register the new device.
""",
}


@dataclass(frozen=True, slots=True)
class Question:
    text: str
    document: str
    paraphrased: bool


QUESTIONS: list[Question] = [
    # Direct: the document's own words.
    Question(
        "How do I descale the Brewmaster 9 espresso machine?", "brewmaster-espresso.md", False
    ),
    Question("Why does the Aurora thermostat need a C-wire?", "aurora-thermostat.md", False),
    Question(
        "How long does the Trailblazer battery take to charge?", "trailblazer-ebike.txt", False
    ),
    Question("When should I replace the Nimbus docking station bag?", "nimbus-vacuum.md", False),
    Question("How do I repair a crack in the kayak hull?", "harbor-kayak.md", False),
    Question("How do I fill the fountain pen converter with ink?", "quill-fountain-pen.txt", False),
    Question(
        "How do I create a watering schedule on the Sprout Hub?", "sprout-irrigation.md", False
    ),
    Question("Can I wash the Polar sleeping bag in a machine?", "polar-sleeping-bag.txt", False),
    Question("How do I collimate the Orion telescope mirrors?", "orion-telescope.md", False),
    Question("Why is my Beacon smoke alarm chirping?", "beacon-smoke-alarm.md", False),
    Question("Does the Sonata piano send MIDI over USB?", "sonata-piano.md", False),
    Question("What if I forget my Vault master password?", "vault-passwords.md", False),
    # Paraphrased: the problem in other words.
    Question(
        "The house is freezing although the wall unit says it is warming",
        "aurora-thermostat.md",
        True,
    ),
    Question("A white crust builds up inside my coffee maker", "brewmaster-espresso.md", True),
    Question("How many miles can I cycle before the pack is empty?", "trailblazer-ebike.txt", True),
    Question("The cleaning robot keeps falling off ledges", "nimbus-vacuum.md", True),
    Question("Waves splash into my boat while I paddle", "harbor-kayak.md", True),
    Question(
        "My writing instrument scratches and leaves gaps in the lines",
        "quill-fountain-pen.txt",
        True,
    ),
    Question("Plants get drowned after a rainy night", "sprout-irrigation.md", True),
    Question(
        "Will it keep me warm when camping in snow and frost?", "polar-sleeping-bag.txt", True
    ),
    Question("Stars look like blurry smudges through the scope", "orion-telescope.md", True),
    Question("The detector on the ceiling beeps once a minute", "beacon-smoke-alarm.md", True),
    Question("Which foot control holds the sound of the keys?", "sonata-piano.md", True),
    Question("I lost my phone and cannot pass the second login step", "vault-passwords.md", True),
]


def write_corpus(folder: Path) -> Path:
    """The documents as files in ``folder`` (created); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in DOCUMENTS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def hit_rate(results: dict[str, list[str]], *, paraphrased: bool | None = None) -> float:
    """Share of QUESTIONS (all, or only the paraphrased or the direct ones) whose document is
    among their retrieved sources (file names)."""
    asked = [q for q in QUESTIONS if paraphrased is None or q.paraphrased == paraphrased]
    return sum(q.document in results[q.text] for q in asked) / len(asked)


_WORD = re.compile(r"\w+")


class HashingEmbedder(MockProvider):
    """A provider whose vectors are real, not mock: hashed bag-of-words (feature hashing),
    so texts sharing words are near. Deterministic and instant: for the store's vector path
    in tests, not for quality. ``fail`` makes ``embed`` raise ProviderUnavailable."""

    name = "hashing"
    default_embedding_model = "hashing-64"

    def __init__(self, model: str = "hashing-64", dimensions: int = 64) -> None:
        self.model = model
        self.default_embedding_model = model
        self.dimensions = dimensions
        self.fail = False
        self.calls = 0
        self.texts = 0

    async def embed(self, texts: list[str], *, model: str | None = None) -> Embeddings:
        if self.fail:
            raise ProviderUnavailable("embeddings are down")
        self.calls += 1
        self.texts += len(texts)
        return Embeddings(
            [self.vector(text) for text in texts], model=self.model, provider=self.name
        )

    def vector(self, text: str) -> list[float]:
        values = [0.0] * self.dimensions
        for word in _WORD.findall(text.lower()):
            digest = hashlib.sha256(word.encode()).digest()
            values[digest[0] % self.dimensions] += 1.0 if digest[1] % 2 else -1.0
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        return [v / norm for v in values]
