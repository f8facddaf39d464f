"""The embedded synthetic stand-in for the CL benchmark.

For each of the 15 tasks it writes a task with the same name, category and label set, in the O-LoRA
folder layout (`<Category>/<name>/{train,dev,test}.json`, `labels.json`, `instruction_config.json`),
from vocabularies and templates written for this project (no third-party text).

How the tasks are made learnable, and how they interfere like the real ones:
- every example carries cue words of its label, hidden among filler words; a small model learns the
  cue -> label mapping in a few hundred steps;
- concepts are shared across tasks: the sports cues mark `Sports` in agnews and yahoo and `Athlete`
  in dbpedia; the sentiment cues mark all SC tasks; the True/False tasks share label words and part
  of their cue words, with partly conflicting meanings (a word that means True in one task means
  False in another), so training on one task overwrites what another needs;
- all tasks draw their filler from one pool, so vocabularies overlap.
Sequential fine-tuning therefore forgets visibly, while a method that isolates tasks need not.
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

from harness.benchmark import Benchmark, Task, load_benchmark

GENERATOR_VERSION = 3  # bump when the output changes, so cached copies are rebuilt

FILLER = (
    "the a of and to in it was this that with for on some many then also about after before "
    "during while place time people day year way thing part side group town city area week "
    "night morning home world life hand story point case number fact kind others each every "
    "often never quite rather just still only even much more most first last next long new "
    "old great small large local open early late well back over under around between across"
).split()

# Topic concepts, shared by the three TC tasks.
TOPICS = {
    "sports": "match league coach goal stadium tournament season player team championship",
    "business": "market profit shares investor revenue merger bank trade economy earnings",
    "science": "research laboratory experiment physics theory molecule scientist equation",
    "technology": "software computer internet chip network device digital browser",
    "politics": "election government minister parliament policy senate vote law",
    "world": "nation border embassy treaty conflict foreign summit refugees",
    "health": "doctor hospital disease medicine patient therapy diet symptom",
    "education": "school student teacher course exam lesson degree homework",
    "entertainment": "concert song actor band show festival singer stage",
    "family": "parents marriage friend wedding child dating sister husband",
    "society": "religion tradition culture custom community belief holiday ritual",
    "company": "founded headquartered corporation firm subsidiary manufacturer",
    "institution": "college academy campus institute faculty enrolled",
    "artist": "painter musician sculptor exhibition gallery portrait",
    "athlete": "footballer olympic sprinter boxer cyclist medal",
    "officeholder": "mayor governor senator served elected deputy",
    "transport": "locomotive aircraft ship engine railway vehicle",
    "building": "tower church bridge castle mansion constructed",
    "nature": "river mountain lake valley glacier tributary",
    "village": "hamlet municipality county parish district rural",
    "animal": "species mammal insect beetle moth genus",
    "plant": "flower shrub orchid leaves herb botanical",
    "album": "tracks recorded studio released ep compilation",
    "film": "directed starring screenplay premiere cinema sequel",
    "written": "novel author published magazine poem chapter",
}

TOPIC_OF_LABEL = {
    "dbpedia": {
        "Company": ["company", "business"], "Educational Institution": ["institution", "education"],
        "Artist": ["artist", "entertainment"], "Athlete": ["athlete", "sports"],
        "Office Holder": ["officeholder", "politics"], "Mean of Transportation": ["transport"],
        "Building": ["building"], "Natural Place": ["nature"], "Village": ["village"],
        "Animal": ["animal"], "Plant": ["plant"], "Album": ["album"], "Film": ["film"],
        "Written Work": ["written"],
    },
    "agnews": {
        "World": ["world", "politics"], "Sports": ["sports"], "Business": ["business"],
        "Science or Technology": ["science", "technology"],
    },
    "yahoo": {
        "Society & Culture": ["society"], "Science & Mathematics": ["science"],
        "Health": ["health"], "Education & Reference": ["education"],
        "Computers & Internet": ["technology"], "Sports": ["sports"],
        "Business & Finance": ["business"], "Entertainment & Music": ["entertainment"],
        "Family & Relationships": ["family"], "Politics & Government": ["politics"],
    },
}

SENTIMENT = {
    "very negative": "awful terrible horrible dreadful worst disgusting",
    "negative": "poor bad dull disappointing mediocre weak",
    "neutral": "okay average fine ordinary acceptable plain",
    "positive": "good nice pleasant solid enjoyable decent",
    "very positive": "excellent amazing superb wonderful outstanding brilliant",
}
SENTIMENT_OF_LABEL = {
    "Good": ["positive", "very positive"],
    "Bad": ["negative", "very negative"],
}
DOMAIN = {
    "amazon": "product item package delivery price battery quality seller",
    "yelp": "food service waiter menu table dinner kitchen staff",
    "IMDB": "movie plot actors scene ending director cast",
    "SST-2": "film story performance script characters humor",
}

NLI_CUES = {
    "entailment": "indeed therefore clearly certainly surely",
    "contradiction": "never not nobody none nothing",
    "neutral": "perhaps maybe possibly might probably",
}
NLI_SUBJECTS = ["the farmer", "the teacher", "a child", "the driver", "my neighbour", "the doctor", "a tourist"]

# True/False tasks: cue words overlap across tasks, and some flip meaning between tasks.
BINARY_CUES = {
    "QQP": {"True": "same alike similar equal", "False": "different unrelated distinct other"},
    "BoolQA": {"True": "yes correct indeed right", "False": "no wrong never different"},
    "MultiRC": {"True": "correct right accurate same", "False": "wrong incorrect mistaken yes"},
    "WiC": {"True": "same identical alike equal", "False": "different distinct separate unrelated"},
}
COPA_CUES = {"right": "because since so thus", "wrong": "although despite unless yet"}

INSTRUCTIONS = {
    "TC": "Which topic does this text belong to? Pick one option.\n",
    "SC": "How does the writer feel in this text? Pick one option.\n",
    "NLI": "How does sentence 2 relate to sentence 1? Pick one option.\n",
    "QQP": "Do the two questions ask the same thing? Pick one option.\n",
    "BoolQA": "Is the question true or false given the passage? Pick one option.\n",
    "MultiRC": "Is the candidate answer true or false given the paragraph? Pick one option.\n",
    "WiC": "Is the word used with the same meaning in both sentences? Pick one option.\n",
}


def _words(text: str) -> list[str]:
    return text.split()


def _clause(rng: random.Random, lead: str, n_filler: int = 4) -> str:
    """A clause led by `lead` (a connective, a cue word), then filler words."""
    return " ".join([lead] + [rng.choice(FILLER) for _ in range(n_filler)])


class _Writer:
    """Builds the sentences of one task; `rng` is seeded per task so tasks are independent."""

    def __init__(self, task: Task, rng: random.Random, distractor_rate: float):
        self.task = task
        self.rng = rng
        self.distractor_rate = distractor_rate

    def filler(self, n: int, extra: list[str] = ()) -> list[str]:
        pool = FILLER + list(extra)
        return [self.rng.choice(pool) for _ in range(n)]

    def blend(self, cues: list[str], n_filler: int, extra: list[str] = ()) -> str:
        words = self.filler(n_filler, extra) + cues
        self.rng.shuffle(words)
        return " ".join(words)

    def cue_words(self, label_cues: dict[str, list[str]], label: str, k: int = 3) -> list[str]:
        cues = [self.rng.choice(label_cues[label]) for _ in range(k)]
        others = [lab for lab in label_cues if lab != label]
        if others and self.rng.random() < self.distractor_rate:
            cues.append(self.rng.choice(label_cues[self.rng.choice(others)]))
        return cues

    # One method per category, each returning the sentence for a given label.
    def TC(self, label: str) -> str:
        label_cues = {
            lab: [w for topic in topics for w in _words(TOPICS[topic])]
            for lab, topics in TOPIC_OF_LABEL[self.task.name].items()
        }
        title = self.blend(self.cue_words(label_cues, label, k=1)[:1], 2)
        text = self.blend(self.cue_words(label_cues, label), 6)
        if self.task.name == "yahoo":
            return f"Question: {title}?\nAnswer: {text}"
        return f"Title: {title}\nText: {text}"

    def SC(self, label: str) -> str:
        groups = SENTIMENT_OF_LABEL.get(label, [label])
        label_cues = {
            lab: [w for g in SENTIMENT_OF_LABEL.get(lab, [lab]) for w in _words(SENTIMENT[g])]
            for lab in self.task.labels
        }
        assert set(groups) <= set(SENTIMENT)
        text = self.blend(self.cue_words(label_cues, label), 6, _words(DOMAIN[self.task.name]))
        if self.task.name == "amazon":
            return f"Title: {self.blend([], 3, _words(DOMAIN['amazon']))}\nText: {text}"
        if self.task.name == "IMDB":
            return text
        return f"Text: {text}"

    def NLI(self, label: str) -> str:
        label_cues = {lab: _words(NLI_CUES[lab]) for lab in self.task.labels}
        subject = self.rng.choice(NLI_SUBJECTS)
        first = f"{subject} {self.blend([], 6)}."
        second = f"{subject} {self.blend(self.cue_words(label_cues, label), 4)}."
        return f"sentence 1: {first}\nsentence 2: {second}"

    def _binary_cues(self) -> dict[str, list[str]]:
        return {lab: _words(BINARY_CUES[self.task.name][lab]) for lab in self.task.labels}

    def QQP(self, label: str) -> str:
        cues = self.cue_words(self._binary_cues(), label)
        return f"first sentence: {self.blend([], 6)}?\nsecond sentence: {self.blend(cues, 5)}?"

    def BoolQA(self, label: str) -> str:
        cues = self.cue_words(self._binary_cues(), label)
        return f"question: {self.blend(cues[:1], 4)}\npassage: {self.blend(cues[1:], 10)}"

    def MultiRC(self, label: str) -> str:
        cues = self.cue_words(self._binary_cues(), label)
        return (f"paragraph: {self.blend(cues[1:], 10)}\nquestion: {self.blend([], 4)}?\n"
                f"candidate answer: {self.blend(cues[:1], 3)}")

    def WiC(self, label: str) -> str:
        cues = self.cue_words(self._binary_cues(), label)
        word = self.rng.choice(FILLER[20:])
        return f"word: {word}\n{self.blend([word, cues[0]], 5)}.\n{self.blend([word] + cues[1:], 5)}."

    def COPA(self, label: str) -> str:
        # Each option is a clause led by its connective, as in text.
        right = _clause(self.rng, self.rng.choice(_words(COPA_CUES["right"])))
        wrong = _clause(self.rng, self.rng.choice(_words(COPA_CUES["wrong"])))
        a, b = (right, wrong) if label == "A" else (wrong, right)
        asked = self.rng.choice(["cause", "effect"])
        return (f'Which option is the {asked} of "{self.blend([], 5)}."? Answer A or B.\n'
                f"A: {a}.\nB: {b}.")


def generate_task(task: Task, n_train: int, n_test: int, seed: int,
                  distractor_rate: float = 0.3) -> dict[str, list[dict]]:
    """Records for one task: label-balanced, shuffled; train, test and dev drawn independently
    (dev last, so train and test are those of the generator that copied test into dev)."""
    rng = random.Random(f"{seed}:{task.name}")
    writer = _Writer(task, rng, distractor_rate)
    make = getattr(writer, task.category)

    def split(n: int) -> list[dict]:
        labels = [task.labels[i % len(task.labels)] for i in range(n)]
        rng.shuffle(labels)
        return [{"sentence": make(lab), "label": lab} for lab in labels]

    train, test = split(n_train), split(n_test)
    return {"train": train, "dev": split(n_test), "test": test}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=0))
    os.replace(tmp, path)


def generate(out_dir: Path, n_train: int = 1000, n_test: int = 200, seed: int = 0,
             benchmark: Benchmark | None = None) -> Path:
    """Write the synthetic benchmark to `out_dir` (O-LoRA layout) and return it.

    A `MANIFEST.json` written last marks a complete folder; it records the generator version and
    sizes, so a stale or partial folder is rebuilt.
    """
    benchmark = benchmark or load_benchmark()
    manifest = {"generator": "harness.synthetic", "version": GENERATOR_VERSION,
                "n_train": n_train, "n_test": n_test, "seed": seed}
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in benchmark.tasks.values():
        folder = out_dir / task.folder
        folder.mkdir(parents=True, exist_ok=True)
        for split, records in generate_task(task, n_train, n_test, seed).items():
            _write_json(folder / f"{split}.json", records)
        _write_json(folder / "labels.json", list(task.labels))
    _write_json(out_dir / "instruction_config.json", {
        cat: [{"instruction_type": "zero-shot", "instruction": text}]
        for cat, text in INSTRUCTIONS.items()
    })
    _write_json(out_dir / "MANIFEST.json", manifest)
    return out_dir


def ensure_synthetic(out_dir: Path, **kwargs) -> Path:
    """Generate the synthetic benchmark unless a complete, current copy exists."""
    manifest = out_dir / "MANIFEST.json"
    if manifest.exists():
        try:
            found = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            found = {}
        wanted = {"version": GENERATOR_VERSION, "n_train": kwargs.get("n_train", 1000),
                  "n_test": kwargs.get("n_test", 200), "seed": kwargs.get("seed", 0)}
        if all(found.get(k) == v for k, v in wanted.items()):
            return out_dir
    return generate(out_dir, **kwargs)


def is_synthetic(data_dir: Path) -> bool:
    manifest = Path(data_dir) / "MANIFEST.json"
    if not manifest.exists():
        return False
    try:
        return json.loads(manifest.read_text()).get("generator") == "harness.synthetic"
    except json.JSONDecodeError:
        return False


# -- pretraining the embedded backbone ----------------------------------------------------------
# What a real pretrained model brings to the benchmark, made from this module's vocabularies:
# - knowledge: which words go together and what the group is called (cue words of a topic,
#   sentiment or NLI relation -> its names, the label strings that use it), in a plain
#   "words / Theme: name" format that is not the benchmark's prompt, so the benchmark's tasks
#   still start near 0% zero-shot and must be learnt from their training split;
# - held-out tasks in the benchmark's prompt format (instruction, option list, text): concepts
#   mapped to label strings of random words, never a benchmark label, so the model learns to read
#   an option list and write one option back; the True/False cue words enter here only as word
#   groups by meaning (which group is True is each task's own, partly conflicting, rule);
# - held-out two-option tasks in COPA's format (which of A and B holds a cue of a given group).
PRETRAINING_VERSION = 2  # bump when the examples change, so cached pretrained backbones are rebuilt
_CONCEPTS = {**{f"topic:{k}": v.split() for k, v in TOPICS.items()},
             **{f"sentiment:{k}": v.split() for k, v in SENTIMENT.items()},
             **{f"nli:{k}": v.split() for k, v in NLI_CUES.items()},
             # the True/False and COPA cue words, grouped by what they mean
             "binary:alike": "same alike similar equal identical".split(),
             "binary:apart": "different unrelated distinct other separate".split(),
             "binary:yes": "yes correct indeed right accurate".split(),
             "binary:no": "no wrong never incorrect mistaken".split(),
             "copa:reason": COPA_CUES["right"].split(), "copa:concession": COPA_CUES["wrong"].split()}
_GROUPS = [[c for c in _CONCEPTS if c.startswith(prefix)]
           for prefix in ("topic:", "sentiment:", "nli:", "binary:", "copa:")]
_LABEL_WORDS = sorted({w for words in _CONCEPTS.values() for w in words} | set(FILLER))


def _concept_names() -> dict[str, list[str]]:
    """Each topic, sentiment and NLI concept's names: the label strings that use it."""
    names: dict[str, set[str]] = {}
    for labels in TOPIC_OF_LABEL.values():
        for label, topics in labels.items():
            for topic in topics:
                names.setdefault(f"topic:{topic}", set()).add(label)
    for group in SENTIMENT:
        names.setdefault(f"sentiment:{group}", {group})
    for label, groups in SENTIMENT_OF_LABEL.items():
        for group in groups:
            names[f"sentiment:{group}"].add(label)
    for relation in NLI_CUES:
        names[f"nli:{relation}"] = {relation}
    return {concept: sorted(found) for concept, found in sorted(names.items())}


def _heldout_task(rng: random.Random, taken: set[str]) -> dict:
    group = rng.choice(_GROUPS)
    concepts = rng.sample(group, rng.randint(2, min(14, len(group))))
    labels: list[str] = []
    while len(labels) < len(concepts):
        words = [rng.choice(_LABEL_WORDS) for _ in range(rng.choice([1, 1, 1, 2, 2, 3]))]
        words = [w.capitalize() if rng.random() < 0.5 else w for w in words]
        label = rng.choice([" ", " or ", " & ", " of "]).join(words)
        if label not in labels and label.lower() not in taken:  # never a benchmark label
            labels.append(label)
    return {"concepts": concepts, "labels": labels, "instruction": rng.choice(list(INSTRUCTIONS.values()))}


def _text(rng: random.Random, concept: str, n_cues: int = 3, n_filler: int = 6) -> str:
    words = [rng.choice(FILLER) for _ in range(n_filler)]
    words += [rng.choice(_CONCEPTS[concept]) for _ in range(n_cues)]
    rng.shuffle(words)
    return " ".join(words)


def _option_example(rng: random.Random, task: dict) -> tuple[str, str]:
    k = rng.randrange(len(task["concepts"]))
    text = _text(rng, task["concepts"][k])
    if rng.random() < 0.3:  # a distractor, as the benchmark tasks have
        text += " " + rng.choice(_CONCEPTS[rng.choice(task["concepts"])])
    return (f"{task['instruction']}Option: {', '.join(task['labels'])} \nText: {text}\nAnswer:",
            task["labels"][k])


def _knowledge_example(rng: random.Random, names: dict[str, list[str]]) -> tuple[str, str]:
    concept = rng.choice(sorted(names))
    return f"{_text(rng, concept)}\nTheme:", rng.choice(names[concept])


def _two_option_example(rng: random.Random, pair: tuple[str, str]) -> tuple[str, str]:
    # Each option a clause led by a cue word, as COPA's are by their connective.
    right, wrong = (_clause(rng, rng.choice(_CONCEPTS[c])) for c in pair)
    answer = rng.choice("AB")
    a, b = (right, wrong) if answer == "A" else (wrong, right)
    asked = rng.choice(["cause", "effect"])
    premise = " ".join(rng.choice(FILLER) for _ in range(5))
    question = f'Which option is the {asked} of "{premise}."?'
    return f"{question} Answer A or B.\nA: {a}.\nB: {b}.", answer


def pretraining_examples(seed: int, n_tasks: int = 48):
    """An endless, seeded stream of (source, target) pairs: knowledge (half), held-out option
    tasks (35%) and held-out two-option tasks (15%); see the comment above."""
    rng = random.Random(f"pretraining:{seed}")
    taken = {label.lower() for task in load_benchmark().tasks.values() for label in task.labels}
    tasks = [_heldout_task(rng, taken) for _ in range(n_tasks)]
    names = _concept_names()
    pairs = [tuple(rng.sample(sorted(_CONCEPTS), 2)) for _ in range(n_tasks)]
    while True:
        draw = rng.random()
        if draw < 0.5:
            yield _knowledge_example(rng, names)
        elif draw < 0.85:
            yield _option_example(rng, rng.choice(tasks))
        else:
            yield _two_option_example(rng, rng.choice(pairs))


def tokenizer_phrases() -> tuple[str, ...]:
    """What the embedded tokenizer keeps as one piece each: the instructions. Each is the same in
    every example of its task type, so it tells the model only which type the task is, as one
    piece does; word by word it was 10-14 pieces, a quarter of an input (as the "Task:" and
    "Dataset:" prefixes are pieces of their own, see below). The option lists stay words: reading
    an option and writing it back is what the pretraining teaches."""
    return tuple(text.strip() for text in INSTRUCTIONS.values())


@functools.lru_cache(maxsize=1)  # every run names its backbone by it: 0.7 s to generate
def tokenizer_corpus(n_pretraining: int = 4000) -> tuple[str, ...]:
    """The text the embedded backbone's tokenizer is trained on: the synthetic benchmark's training
    examples (200 per task) and pretraining examples; the same on every machine and for every data
    folder, so one pretrained backbone serves every run."""
    benchmark = load_benchmark()
    corpus = list(INSTRUCTIONS.values())
    for task in benchmark.tasks.values():
        # Each sentence behind the reference prompt's prefixes (harness.data.build_source), so that
        # "Task:TC Dataset:dbpedia" are pieces of their own as a pretrained tokenizer's words are,
        # not 16 letters and pairs: they were a third of every input.
        header = f"Task:{task.category}\nDataset:{task.name}\n"
        corpus += [header + r["sentence"] for r in generate_task(task, 200, 0, seed=0)["train"]]
        # Its option line too, so that "negative," is one piece in the benchmark's inputs as such
        # words are in the pretraining examples' option lists (not a word and a comma).
        corpus += [*task.labels, f"Option: {', '.join(task.labels)}"]
    examples = pretraining_examples(0)
    for _ in range(n_pretraining):
        corpus += next(examples)
    return tuple(corpus)
