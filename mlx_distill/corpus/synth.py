"""`python -m mlx_distill corpus synth`: a demo corpus written by this project's own generator.

    python -m mlx_distill corpus synth --out corpora/demo
    python -m mlx_distill corpus synth --out corpora/tiny --n-train 50 --n-valid 10 --n-test 10 --max-ops 2

Grade-school arithmetic word problems (shopping, sharing, time, distance, savings, ...) drawn
from the templates below, with names and items from short lists, small numbers and 1-3
operations (+, -, *, /) whose every intermediate result is a whole number. Each record has
the step-by-step solution in ``reasoning`` (one ``a op b = c`` step per line) and the final
answer in ``answer``; ``data.render_assistant`` appends the ``#### answer`` line, so the
model learns ``steps + #### answer``, the same format `eval --dataset corpus` grades.

Output (written as one folder swap, so a reader never sees half of it)::

    train.jsonl valid.jsonl test.jsonl   {id, question, reasoning, answer, answer_format: "####",
                                          source: "synth", template, ops}
    manifest.json                        generator version, config, counts, sha256 of each file

Deterministic: the same settings give byte-identical split files. No question occurs twice
(compared as ``problems.normalize_text``), so no test question is also a training or
validation question and `eval --overlap refuse` passes on the test split.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mlx_distill import config as C
from mlx_distill.io import InputError, atomic_dir, atomic_write_json, read_json, sha256_file, versions, writable_dir, \
    write_jsonl
from mlx_distill.tasks.problems import normalize_text

GENERATOR = "mlx_distill.corpus.synth/1"  # bump when the templates or the draw change
SPLITS = ("train", "valid", "test")

# ----------------------------------------------------------------------------- word lists
# (name, subject pronoun, object pronoun, possessive)
PEOPLE = [(n, "she", "her", "her") for n in ("Mia", "Lena", "Sofia", "Ava", "Nora", "Priya", "Hana", "Zoe",
                                              "Lucia", "Amara", "Ines", "Grace")] + \
         [(n, "he", "him", "his") for n in ("Leo", "Omar", "Ben", "Kenji", "Mateo", "Ravi", "Tom", "Felix",
                                            "Diego", "Sam", "Yusuf", "Arjun")]
SHOP_ITEMS = ["pencils", "notebooks", "stickers", "apples", "muffins", "postcards", "markers", "oranges",
              "erasers", "cupcakes", "balloons", "candles"]
THINGS = ["marbles", "stickers", "shells", "stamps", "coins", "cards", "beads", "buttons", "stones", "crayons"]
FOODS = ["cookies", "grapes", "strawberries", "crackers", "cherries", "biscuits", "dumplings", "plums"]
PLANTS = ["tulips", "carrots", "tomato plants", "sunflowers", "cabbages", "rose bushes", "pepper plants"]
VEHICLES = ["bus", "train", "truck", "ferry", "tractor", "van"]
ACTIVITIES = ["piano", "football", "chess", "drawing", "swimming", "guitar", "reading"]
CONTAINERS = [("boxes", "box"), ("bags", "bag"), ("jars", "jar"), ("baskets", "basket"), ("packs", "pack")]


class Steps:
    """Solution lines under construction: each `calc` checks the operation and records it."""

    def __init__(self):
        self.lines: list[str] = []
        self.ops: list[str] = []

    def calc(self, a: int, op: str, b: int, line: str) -> int:
        """Compute ``a op b`` (whole numbers only) and add `line` with ``{eq}`` -> ``a op b = c``."""
        if op == "+":
            c = a + b
        elif op == "-":
            c = a - b
        elif op == "*":
            c = a * b
        elif op == "/":
            if b == 0 or a % b:
                raise ValueError(f"{a} / {b} is not a whole number")
            c = a // b
        else:
            raise ValueError(f"unknown operation {op!r}")
        if c < 0:
            raise ValueError(f"{a} {op} {b} is negative")
        self.lines.append(line.replace("{eq}", f"{a} {op} {b} = {c}"))
        self.ops.append(op)
        return c


@dataclass
class Draw:
    """Seeded choices for one problem."""

    rng: random.Random

    def n(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def pick(self, xs):
        return self.rng.choice(xs)

    def person(self):
        return self.pick(PEOPLE)

    def two_people(self):
        a = self.person()
        b = self.pick([p for p in PEOPLE if p[0] != a[0]])
        return a, b


Template = Callable[[Draw, Steps], tuple[str, int]]  # -> (question, answer); steps filled in
TEMPLATES: dict[str, tuple[int, Template]] = {}  # name -> (number of operations, template)


def template(name: str, ops: int):
    def reg(fn):
        TEMPLATES[name] = (ops, fn)
        return fn
    return reg


# ----------------------------------------------------------------------------- one operation
@template("shop-price", 1)
def _(d: Draw, s: Steps):
    (name, he, _, _), item, k, p = d.person(), d.pick(SHOP_ITEMS), d.n(2, 9), d.n(2, 9)
    c = s.calc(k, "*", p, f"{name} pays {{eq}} dollars.")
    return f"{name} buys {k} {item} that cost {p} dollars each. How many dollars does {he} pay?", c


@template("share", 1)
def _(d: Draw, s: Steps):
    (name, _, _, _), thing, k, q = d.person(), d.pick(THINGS), d.n(2, 6), d.n(2, 9)
    c = s.calc(k * q, "/", k, f"Each friend gets {{eq}} {thing}.")
    return (f"{name} has {k * q} {thing} and shares them equally among {k} friends. "
            f"How many {thing} does each friend get?", c)


@template("gift", 1)
def _(d: Draw, s: Steps):
    ((name, _, _, _), (other, _, _, _)), thing, a, b = d.two_people(), d.pick(THINGS), d.n(3, 40), d.n(2, 30)
    c = s.calc(a, "+", b, f"{name} now has {{eq}} {thing}.")
    return f"{name} has {a} {thing}. {other} gives {name} {b} more. How many {thing} does {name} have now?", c


@template("eat", 1)
def _(d: Draw, s: Steps):
    (name, _, _, _), food, a = d.person(), d.pick(FOODS), d.n(6, 40)
    b = d.n(1, a - 1)
    c = s.calc(a, "-", b, f"There are {{eq}} {food} left.")
    return f"There are {a} {food} on a plate. {name} eats {b} of them. How many {food} are left?", c


@template("reading", 1)
def _(d: Draw, s: Steps):
    (name, he, _, _), a, days = d.person(), d.n(2, 12), d.n(2, 9)
    c = s.calc(a, "*", days, f"{name} reads {{eq}} pages.")
    return f"{name} reads {a} pages every day. How many pages does {he} read in {days} days?", c


@template("garden-rows", 1)
def _(d: Draw, s: Steps):
    plant, rows, per = d.pick(PLANTS), d.n(2, 9), d.n(2, 12)
    c = s.calc(rows, "*", per, f"The garden has {{eq}} {plant}.")
    return f"A garden has {rows} rows with {per} {plant} in each row. How many {plant} are in the garden?", c


@template("speed", 1)
def _(d: Draw, s: Steps):
    v, speed, hours = d.pick(VEHICLES), d.n(2, 12) * 5, d.n(2, 5)
    c = s.calc(speed, "*", hours, f"The {v} travels {{eq}} kilometers.")
    return f"A {v} travels {speed} kilometers every hour. How many kilometers does it travel in {hours} hours?", c


@template("age", 1)
def _(d: Draw, s: Steps):
    (name, he, _, _), age, later = d.person(), d.n(4, 15), d.n(2, 20)
    c = s.calc(age, "+", later, f"{name} will be {{eq}} years old.")
    return f"{name} is {age} years old. How old will {he} be in {later} years?", c


@template("bus-stop", 1)
def _(d: Draw, s: Steps):
    a = d.n(10, 50)
    b = d.n(2, a - 2)
    c = s.calc(a, "-", b, f"There are {{eq}} passengers on the bus.")
    return f"A bus has {a} passengers. At the next stop {b} passengers get off. How many passengers are on the bus now?", c


@template("practice-split", 1)
def _(d: Draw, s: Steps):
    (name, he, _, his), act, days, per = d.person(), d.pick(ACTIVITIES), d.n(2, 7), d.n(2, 12) * 5
    c = s.calc(per * days, "/", days, f"{name} practices for {{eq}} minutes each day.")
    return (f"{name} practices {act} for {per * days} minutes in total, split evenly over {days} days. "
            f"How many minutes does {he} practice each day?", c)


# ----------------------------------------------------------------------------- two operations
@template("shop-change", 2)
def _(d: Draw, s: Steps):
    (name, he, _, _), item, k, p = d.person(), d.pick(SHOP_ITEMS), d.n(2, 6), d.n(2, 8)
    bill = d.pick([b for b in (20, 50, 100) if b > k * p])
    cost = s.calc(k, "*", p, f"The {item} cost {{eq}} dollars.")
    c = s.calc(bill, "-", cost, f"{name} gets {{eq}} dollars back.")
    return (f"{name} buys {k} {item} at {p} dollars each and pays with a {bill}-dollar bill. "
            f"How many dollars does {he} get back?", c)


@template("savings-spend", 2)
def _(d: Draw, s: Steps):
    (name, he, _, _), per, weeks, item = d.person(), d.n(2, 10), d.n(2, 8), d.pick(["book", "game", "kite", "ball"])
    saved = s.calc(per, "*", weeks, f"{name} saves {{eq}} dollars.")
    price = d.n(1, saved - 1)
    c = s.calc(saved, "-", price, f"{name} has {{eq}} dollars left.")
    return (f"{name} saves {per} dollars every week for {weeks} weeks. Then {he} spends {price} dollars on a {item}. "
            f"How many dollars does {he} have left?", c)


@template("item-plus-one", 2)
def _(d: Draw, s: Steps):
    (name, he, _, _), item, k, p, extra = d.person(), d.pick(SHOP_ITEMS), d.n(2, 6), d.n(2, 9), d.n(2, 15)
    cost = s.calc(k, "*", p, f"The {item} cost {{eq}} dollars.")
    c = s.calc(cost, "+", extra, f"{name} spends {{eq}} dollars in total.")
    return (f"{name} buys {k} {item} for {p} dollars each and a bag for {extra} dollars. "
            f"How many dollars does {he} spend in total?", c)


@template("boxes-share", 2)
def _(d: Draw, s: Steps):
    (name, _, _, _), thing, (boxes, _), k = d.person(), d.pick(THINGS), d.pick(CONTAINERS), d.n(2, 5)
    nb = d.n(2, 6)
    per = k * d.n(1, 4)  # boxes * per is a multiple of k
    total = s.calc(nb, "*", per, f"{name} has {{eq}} {thing}.")
    c = s.calc(total, "/", k, f"Each friend gets {{eq}} {thing}.")
    return (f"{name} has {nb} {boxes} with {per} {thing} in each. {name} shares all of them equally among "
            f"{k} friends. How many {thing} does each friend get?", c)


@template("collect-give", 2)
def _(d: Draw, s: Steps):
    ((name, he, _, _), (other, _, _, _)), thing, a, b = d.two_people(), d.pick(THINGS), d.n(5, 30), d.n(2, 20)
    total = s.calc(a, "+", b, f"{name} has {{eq}} {thing}.")
    give = d.n(1, total - 1)
    c = s.calc(total, "-", give, f"{name} has {{eq}} {thing} left.")
    return (f"{name} has {a} {thing} and finds {b} more. Then {he} gives {give} {thing} to {other}. "
            f"How many {thing} does {name} have left?", c)


@template("drive-walk", 2)
def _(d: Draw, s: Steps):
    (name, he, _, _), speed, hours, walk = d.person(), d.n(2, 10) * 10, d.n(2, 4), d.n(2, 9)
    drive = s.calc(speed, "*", hours, f"{name} drives {{eq}} kilometers.")
    c = s.calc(drive, "+", walk, f"{name} travels {{eq}} kilometers in total.")
    return (f"{name} drives at {speed} kilometers per hour for {hours} hours and then walks {walk} kilometers. "
            f"How many kilometers does {he} travel in total?", c)


@template("bake-eat", 2)
def _(d: Draw, s: Steps):
    (name, _, _, _), food, trays, per = d.person(), d.pick(["cookies", "muffins", "rolls", "biscuits"]), d.n(2, 5), d.n(3, 12)
    total = s.calc(trays, "*", per, f"{name} bakes {{eq}} {food}.")
    eaten = d.n(1, total - 1)
    c = s.calc(total, "-", eaten, f"There are {{eq}} {food} left.")
    return (f"{name} bakes {trays} trays of {food} with {per} on each tray. The family eats {eaten} of them. "
            f"How many {food} are left?", c)


@template("class-groups", 2)
def _(d: Draw, s: Steps):
    g = d.n(2, 5)
    total = g * d.n(3, 8)
    girls = d.n(1, total - 1)
    n = s.calc(girls, "+", total - girls, f"There are {{eq}} children.")
    c = s.calc(n, "/", g, f"There are {{eq}} groups.")
    return (f"A class has {girls} girls and {total - girls} boys. The teacher puts the children into groups "
            f"of {g}. How many groups are there?", c)


@template("work-hours", 2)
def _(d: Draw, s: Steps):
    (name, he, _, _), per, days, extra = d.person(), d.n(2, 8), d.n(2, 6), d.n(1, 9)
    week = s.calc(per, "*", days, f"On weekdays {name} works {{eq}} hours.")
    c = s.calc(week, "+", extra, f"{name} works {{eq}} hours in total.")
    return (f"{name} works {per} hours a day for {days} days and then {extra} more hours on Saturday. "
            f"How many hours does {he} work in total?", c)


@template("pocket-split", 2)
def _(d: Draw, s: Steps):
    ((name, _, _, _), (other, _, _, _)), k = d.two_people(), d.n(2, 4)
    total = k * d.n(3, 15)
    a = d.n(1, total - 1)
    t = s.calc(a, "+", total - a, f"Together they have {{eq}} dollars.")
    c = s.calc(t, "/", k, f"Each part is {{eq}} dollars.")
    return (f"{name} has {a} dollars and {other} has {total - a} dollars. They put the money together and "
            f"split it into {k} equal parts. How many dollars is each part?", c)


# ----------------------------------------------------------------------------- three operations
@template("two-items", 3)
def _(d: Draw, s: Steps):
    (name, he, _, _) = d.person()
    i1, i2 = d.rng.sample(SHOP_ITEMS, 2)
    k1, p1, k2, p2 = d.n(2, 6), d.n(2, 9), d.n(2, 6), d.n(2, 9)
    a = s.calc(k1, "*", p1, f"The {i1} cost {{eq}} dollars.")
    b = s.calc(k2, "*", p2, f"The {i2} cost {{eq}} dollars.")
    c = s.calc(a, "+", b, f"{name} spends {{eq}} dollars.")
    return (f"{name} buys {k1} {i1} at {p1} dollars each and {k2} {i2} at {p2} dollars each. "
            f"How many dollars does {he} spend?", c)


@template("shop-extra-change", 3)
def _(d: Draw, s: Steps):
    (name, he, _, _), item, k, p, extra = d.person(), d.pick(SHOP_ITEMS), d.n(2, 5), d.n(2, 8), d.n(2, 9)
    bill = d.pick([b for b in (50, 100) if b > k * p + extra])
    cost = s.calc(k, "*", p, f"The {item} cost {{eq}} dollars.")
    total = s.calc(cost, "+", extra, f"In total {name} pays {{eq}} dollars.")
    c = s.calc(bill, "-", total, f"{name} gets {{eq}} dollars back.")
    return (f"{name} buys {k} {item} at {p} dollars each and a card for {extra} dollars. {name} pays with a "
            f"{bill}-dollar bill. How many dollars does {he} get back?", c)


@template("savings-goal", 3)
def _(d: Draw, s: Steps):
    (name, he, _, his), start, per, weeks = d.person(), d.n(3, 30), d.n(2, 9), d.n(2, 6)
    saved = s.calc(per, "*", weeks, f"{name} saves {{eq}} dollars.")
    total = s.calc(start, "+", saved, f"{name} has {{eq}} dollars.")
    spent = d.n(1, total - 1)
    c = s.calc(total, "-", spent, f"{name} has {{eq}} dollars left.")
    return (f"{name} has {start} dollars in {his} piggy bank. {he.capitalize()} saves {per} dollars every week for "
            f"{weeks} weeks, then spends {spent} dollars. How many dollars does {he} have left?", c)


@template("party-bags", 3)
def _(d: Draw, s: Steps):
    (name, _, _, _), (bags, _), food, k = d.person(), d.pick(CONTAINERS), d.pick(FOODS), d.n(2, 5)
    nb, per = d.n(2, 5), d.n(4, 10)
    total = nb * per
    left = k * d.n(1, (total - 1) // k)  # what is shared is a multiple of the children
    eaten = total - left
    t = s.calc(nb, "*", per, f"There are {{eq}} {food}.")
    rest = s.calc(t, "-", eaten, f"After eating, {{eq}} {food} are left.")
    c = s.calc(rest, "/", k, f"Each child gets {{eq}} {food}.")
    return (f"{name} has {nb} {bags} with {per} {food} in each. {name} eats {eaten} of them and shares the rest "
            f"equally among {k} children. How many {food} does each child get?", c)


@template("running-week", 3)
def _(d: Draw, s: Steps):
    (name, he, _, _), a, wd, b = d.person(), d.n(2, 6), d.n(2, 5), d.n(3, 12)
    week = s.calc(a, "*", wd, f"On weekdays {name} runs {{eq}} kilometers.")
    weekend = s.calc(b, "*", 2, f"On the weekend {name} runs {{eq}} kilometers.")
    c = s.calc(week, "+", weekend, f"{name} runs {{eq}} kilometers in total.")
    return (f"{name} runs {a} kilometers on each of {wd} weekdays and {b} kilometers on each of the 2 weekend "
            f"days. How many kilometers does {he} run in total?", c)


@template("fruit-bags", 3)
def _(d: Draw, s: Steps):
    (name, _, _, _), fruit, k = d.person(), d.pick(["apples", "pears", "lemons", "peaches"]), d.n(2, 6)
    total = k * d.n(3, 10)
    am = d.n(1, total - 1)
    bags = total // k
    sold = d.n(1, bags - 1)
    t = s.calc(am, "+", total - am, f"{name} picks {{eq}} {fruit}.")
    nb = s.calc(t, "/", k, f"That fills {{eq}} bags.")
    c = s.calc(nb, "-", sold, f"{name} has {{eq}} bags left.")
    return (f"{name} picks {am} {fruit} in the morning and {total - am} in the afternoon, and packs them in "
            f"bags of {k}. {name} sells {sold} bags. How many bags are left?", c)


@template("recipe-flour", 3)
def _(d: Draw, s: Steps):
    (name, he, _, _), per, batches = d.person(), d.n(2, 5), d.n(2, 6)
    need = per * batches  # >= 4
    has = d.n(1, need - 2)
    buys = d.n(1, need - has - 1)  # at least one cup is still missing
    n = s.calc(per, "*", batches, f"{name} needs {{eq}} cups of flour.")
    h = s.calc(has, "+", buys, f"{name} has {{eq}} cups.")
    c = s.calc(n, "-", h, f"{name} still needs {{eq}} cups.")
    return (f"One batch of bread needs {per} cups of flour. {name} wants to bake {batches} batches. "
            f"{he.capitalize()} has {has} cups and buys {buys} more. How many more cups does {he} still need?", c)


# ----------------------------------------------------------------------------- corpus
def make_problem(rng: random.Random, min_ops: int = 1, max_ops: int = 3) -> dict:
    """One problem: a template with min_ops..max_ops operations, filled from `rng`."""
    names = [n for n, (k, _) in TEMPLATES.items() if min_ops <= k <= max_ops]
    if not names:
        raise InputError(f"--min-ops {min_ops} --max-ops {max_ops}: no template has that many operations "
                         "(templates have 1 to 3)")
    name = rng.choice(names)
    steps = Steps()
    question, answer = TEMPLATES[name][1](Draw(rng), steps)
    return {"question": question, "reasoning": "\n".join(steps.lines), "answer": str(answer),
            "answer_format": "####", "source": "synth", "template": name, "ops": steps.ops}


def generate(cfg: C.SynthConfig) -> dict[str, list[dict]]:
    """Split name -> records. All questions distinct (normalised), so the splits are disjoint."""
    counts = {"train": cfg.n_train, "valid": cfg.n_valid, "test": cfg.n_test}
    for split, n in counts.items():
        if n < 0:
            raise InputError(f"--n-{split} must be >= 0, got {n}")
    if not 1 <= cfg.min_ops <= cfg.max_ops:
        raise InputError(f"need 1 <= --min-ops <= --max-ops, got --min-ops {cfg.min_ops} --max-ops {cfg.max_ops}")
    want = sum(counts.values())
    rng = random.Random(cfg.seed)
    seen, pool = set(), []
    attempts = 0
    while len(pool) < want:
        attempts += 1
        if attempts > 20 * want + 1000:
            raise InputError(f"only {len(pool)} distinct problems found for {want} requested with --min-ops "
                             f"{cfg.min_ops} --max-ops {cfg.max_ops}; ask for fewer")
        p = make_problem(rng, cfg.min_ops, cfg.max_ops)
        key = normalize_text(p["question"])
        if key in seen:
            continue
        seen.add(key)
        pool.append(p)
    # draw order is already random; splits are consecutive slices of it: test first, so the
    # test split of a corpus stays the same when only --n-train changes
    out, start = {}, 0
    for split in ("test", "valid", "train"):
        rows = pool[start:start + counts[split]]
        start += counts[split]
        out[split] = [{"id": f"synth-{split}-{i:05d}", **r} for i, r in enumerate(rows)]
    return {s: out[s] for s in SPLITS}


def write(cfg: C.SynthConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file, not a folder; choose another --out")
    writable_dir(out.parent, f"--out {out} (its parent folder {out.parent})")  # before any work
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        man = out / "manifest.json"
        stage = read_json(man).get("stage") if man.is_file() else None
        if stage != "corpus-synth":
            raise InputError(f"{out}: folder exists and is not a generated corpus (no corpus-synth manifest.json); "
                             "choose another --out or pass --overwrite")
    splits = generate(cfg)
    with atomic_dir(out) as tmp:
        for split, rows in splits.items():
            write_jsonl(tmp / f"{split}.jsonl", rows)
        atomic_write_json(tmp / "manifest.json", {
            "stage": "corpus-synth", "generator": GENERATOR, "seed": cfg.seed, "config": C.to_dict(cfg),
            "counts": {s: len(r) for s, r in splits.items()},
            "ops": {s: _op_counts(r) for s, r in splits.items()},
            "sha256": {f"{s}.jsonl": sha256_file(tmp / f"{s}.jsonl") for s in SPLITS},
            "record_format": "assistant turn = reasoning + '\\n#### ' + answer (data.render_assistant)",
            "versions": {k: v for k, v in versions().items() if k in ("python", "mlx_distill")}})
    return out


def _op_counts(rows: list[dict]) -> dict:
    c: dict[str, int] = {}
    for r in rows:
        k = f"{len(r['ops'])}-op"
        c[k] = c.get(k, 0) + 1
    return dict(sorted(c.items()))


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = C.from_cli(C.SynthConfig, argv, prog="mlx_distill corpus synth", description=__doc__.split("\n\n")[0])
    out = write(cfg)
    counts = ", ".join(f"{s} {n}" for s, n in read_json(out / "manifest.json")["counts"].items())
    print(f"wrote {out}/train.jsonl, valid.jsonl, test.jsonl, manifest.json ({counts}; seed {cfg.seed})")
