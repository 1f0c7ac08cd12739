"""MFTCoder's data formats, token for token, and the chat template an export carries.

The reference is MFTCoder's rule (mftcoder_accelerate/src/data/preprocess_data.py)
written out plainly here and run with transformers' tokenizer, as MFTCoder runs
it: which strings are encoded together (add_special_tokens=False), where "\\n"
and EOS fall, which tokens are learned. Tokenizers are built here with the
`tokenizers` library; three put a prefix space before every piece of text, as
sentencepiece-style Llama tokenizers do, so encoding "a" + "b" in one call or
in two gives different ids and segment boundaries are tested, not assumed.
"""

import json
import shutil
from pathlib import Path

import pytest
from data_fixtures import CONVERSATIONS, write_jsonl
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megamft.checkpoint.tokenizer_files import (
    CHAT_TEMPLATE_FILE,
    copy_tokenizer,
    write_chat_template,
)
from megamft.data.conversation import Sample
from megamft.data.preprocess import PreprocessError, PreprocessOptions, preprocess
from megamft.data.templates import get_template
from megamft.data.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

STYLES = ("metaspace-always", "metaspace-first", "llama-legacy", "byte-level")
PREFIX_SPACE_STYLES = STYLES[:3]
_CORPUS = [
    "def add(a, b):\n    return a + b",
    "Reverse a list in place with xs.reverse().",
    "human bot system",
    "for i in range(10):\n    print(i)  # say hi",
    "You write Python. Add two numbers.",
] * 10


def _build_tokenizer(folder: Path, style: str) -> Path:
    """A small BPE tokenizer.json with Llama's specials (<s> BOS put in front by its post-processor)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=style != "byte-level"))
    if style == "byte-level":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    else:
        scheme = "first" if style == "metaspace-first" else "always"
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    alphabet = pre_tokenizers.ByteLevel.alphabet() if style == "byte-level" else []
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    if (
        style == "llama-legacy"
    ):  # transformers' legacy Llama: "▁" prepended by the normalizer, to every piece
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        tokenizer.pre_tokenizer = None
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {style: _build_tokenizer(root / style, style) for style in STYLES}


# ------------------------------------------------------------ MFTCoder's rule, written out plainly

MFTCODER_PAIRS = [
    ("prompt", "answer"),
    ("prompt", "response"),
    ("input", "output"),
    ("instruction", "output"),
    ("instruction", "response"),
    ("question", "response"),
    ("question", "answer"),
    ("query", "answer"),
]


def mftcoder_reference(
    record: dict, tokenizer, texts: list | None = None
) -> tuple[list[int], list[int]]:
    """MFTCoder's token ids and loss mask for one record (`tokenizer`: a transformers tokenizer).

    `texts`, if given, receives the strings encoded (EOS as its token string).
    """
    ids, mask = [], []
    texts = [] if texts is None else texts

    def end():
        texts.append(tokenizer.eos_token)
        return [tokenizer.eos_token_id]

    def add(new_ids, learned):
        ids.extend(new_ids)
        mask.extend([learned] * len(new_ids))

    def encode(text):
        texts.append(text)
        return tokenizer.encode(text, add_special_tokens=False)

    def content(text):
        return text.replace("\u202f", " ").replace("\xa0", " ") + "\n"

    pair = next((p for p in MFTCODER_PAIRS if p[0] in record and p[1] in record), None)
    if pair is not None:
        system = content("<s>system\n" + record["system"]) if record.get("system") else ""
        add(encode(system + "<s>human\n" + content(record[pair[0]]) + "<s>bot\n"), 0)
        add(encode(content(record[pair[1]])) + end(), 1)
    elif "chat_rounds" in record:
        rounds = record["chat_rounds"]
        if rounds[0]["role"] == "system":
            add(encode("<s>system\n" + content(rounds[0]["content"])), 0)
            rounds = rounds[1:]
        for i, turn in enumerate(rounds):
            asks = turn["role"] in ("human", "user")
            if asks != (i % 2 == 0):
                raise ValueError("Conversation roles must alternate")
            if asks:
                add(encode("<s>human\n" + content(turn["content"]) + "<s>bot\n"), 0)
            else:
                add(encode(content(turn["content"])) + end(), 1)
                add(encode("\n"), 0)
    else:
        add(encode(content(record["text"])) + end(), 1)
    return ids, mask


def _chat(*turns, system=None) -> dict:
    rounds = [{"role": "system", "content": system}] if system else []
    return {"chat_rounds": rounds + [{"role": role, "content": text} for role, text in turns]}


RECORDS = [
    _chat(
        ("human", "Add two numbers."),
        ("bot", "def add(a, b):\n    return a + b"),
        system="You write Python.",
    ),
    _chat(
        ("human", "Reverse a list."),
        ("bot", "xs[::-1]"),
        ("human", "In place?"),
        ("bot", "  xs.reverse()"),
    ),
    _chat(("user", "Say\u00a0hi\u202fthere."), ("assistant", "hi\n\n")),
    _chat(
        ("human", "print 10 numbers"),
        ("gpt", "for i in range(10):\n    print(i)"),
        system="  Be brief.\n",
    ),
    *[
        {
            p: f"Question {i}: add {i} and {p}.",
            a: f"    return {i} + {a}",
            **({"system": "Be exact."} if i % 2 else {}),
        }
        for i, (p, a) in enumerate(MFTCODER_PAIRS)
    ],
    {"prompt": "no system", "answer": "ok", "system": ""},
    {"text": "def add(a, b):\n    return a + b\n"},
    {"text": "  # indented\u00a0comment"},
]


def _documents(out: Path, name: str) -> list[tuple[list[int], list[int]]]:
    tokens, masks = IndexedDataset(str(out / name)), IndexedDataset(str(out / f"{name}_loss_mask"))
    return [(tokens[i].tolist(), masks[i].tolist()) for i in range(len(tokens))]


@pytest.mark.parametrize("style", STYLES)
def test_mftcoder_template_gives_mftcoder_ids_and_masks_for_every_format(tmp_path, folders, style):
    reference = transformers.AutoTokenizer.from_pretrained(str(folders[style]))
    path = write_jsonl(tmp_path / "in.jsonl", [json.dumps(r) for r in RECORDS])
    out = tmp_path / "out"
    preprocess(
        PreprocessOptions(
            tasks={"t": [str(path)]},
            out_dir=str(out),
            tokenizer=str(folders[style]),
            template="mftcoder",
            dedup=False,
            progress=False,
        )
    )
    documents = _documents(out, "t")
    assert len(documents) == len(RECORDS)
    differ = 0
    for record, (ids, mask) in zip(RECORDS, documents):
        texts = []
        assert (ids, mask) == mftcoder_reference(record, reference, texts), record
        differ += reference.encode("".join(texts), add_special_tokens=False) != ids
    if (
        style in PREFIX_SPACE_STYLES
    ):  # segment boundaries matter: one encode call of the whole text differs
        assert differ >= 3


def test_mftcoder_round_ends_and_learned_tokens(folders):
    """The strings themselves: "{a}\\n" + EOS learned, "\\n" after it in conversations only, text learned whole."""
    tokenizer = load_tokenizer(str(folders["byte-level"]))
    template, _ = get_template("mftcoder", tokenizer)
    eos = tokenizer.eos_id

    def shown(sample):
        return [
            ("</s>" if p == eos else p, learned) for p, learned, _ in template(sample, tokenizer)
        ]

    assert shown([("system", "S"), ("user", "Q"), ("assistant", "A")]) == [
        ("<s>system\nS\n", False),
        ("<s>human\nQ\n<s>bot\n", False),
        ("A\n", True),
        ("</s>", True),
        ("\n", False),
    ]
    pair = Sample((("system", "S"), ("user", "Q"), ("assistant", "A")), form="pair")
    assert shown(pair) == [
        ("<s>system\nS\n<s>human\nQ\n<s>bot\n", False),
        ("A\n", True),
        ("</s>", True),
    ]
    assert shown(Sample(form="text", text="x\u00a0=\u202f1")) == [("x = 1\n", True), ("</s>", True)]


BAD_RECORDS = {
    "ambiguous_record": (
        {"instruction": "Add.", "input": "", "output": "a + b"},
        "input/output, instruction/output); keep the fields of one (MFTCoder would silently read "
        "input/output)",
    ),
    "empty_field": ({"question": "q", "answer": "  "}, "empty 'answer'"),
    "malformed_json": ({"prompt": ["q"], "response": "a"}, "'prompt' must be a string"),
    "missing_field": ({"instruction": "q"}, "no 'chat_rounds', 'messages' or 'text' field"),
    "misplaced_field": (
        {"text": "t", "system": "s"},
        "a top-level 'system' applies to two-field records only",
    ),
    "bad_role_order": (
        _chat(("human", "q1"), ("human", "q2"), ("bot", "a")),
        "'chat_rounds'[1]: role 'human' where 'bot' must come",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_a_bad_record_of_any_format_names_file_and_line_or_is_counted(tmp_path, folders, kind):
    record, reason = BAD_RECORDS[kind]
    good = [json.dumps(r) for r in RECORDS[4:8]]
    path = write_jsonl(tmp_path / "in.jsonl", good[:2] + [json.dumps(record)] + good[2:])
    options = PreprocessOptions(
        tasks={"t": [str(path)]},
        out_dir=str(tmp_path / "out"),
        tokenizer=str(folders["metaspace-always"]),
        progress=False,
    )
    with pytest.raises(PreprocessError) as err:
        preprocess(options)
    assert f"{path}:3: " in str(err.value) and reason in str(err.value), str(err.value)
    options.on_bad_line = "skip"
    task = preprocess(options)["tasks"][0]
    assert task["dropped"] == {kind: 1} and task["documents"] == 4


def test_text_records_learn_every_token_and_pack_with_conversations(tmp_path, folders):
    from megamft.config import DataConfig
    from megamft.data.dataset import load_data

    texts = [{"text": f"def f{i}(x):\n    return x * {i}\n"} for i in range(12)]
    chats = [_chat(("human", f"Add {i}."), ("bot", f"x + {i}")) for i in range(12)]
    path = write_jsonl(
        tmp_path / "in.jsonl", [json.dumps(r) for pair in zip(texts, chats) for r in pair]
    )
    out = tmp_path / "out"
    preprocess(
        PreprocessOptions(
            tasks={"t": [str(path)]},
            out_dir=str(out),
            tokenizer=str(folders["byte-level"]),
            progress=False,
        )
    )
    documents = _documents(out, "t")
    assert all(all(mask) for ids, mask in documents[0::2]) and not any(
        all(mask) for ids, mask in documents[1::2]
    )
    data = load_data(
        DataConfig(
            source="indexed", path=str(out), mode="pack", seq_length=96, valid_samples_per_task=1
        )
    )
    rows = data.train_rows(0, 4, 0, 1)
    batch = data.batches(rows, 4)[0]
    packed = [(int(t), int(d)) for row in rows for t, d in zip(*row)]
    assert any(d % 2 == 0 for _, d in packed) and any(
        d % 2 for _, d in packed
    )  # both kinds share the rows
    for r, row in enumerate(rows):  # a text document's every next token is a learned label
        at = 0
        for task, doc in zip(*row):
            ids, mask = data.stores[task].get(doc)
            n = len(ids) - 1
            assert batch["labels"][r, at : at + n].tolist() == ids[1:].tolist()
            assert batch["loss_mask"][r, at : at + n].tolist() == [float(m) for m in mask[1:]]
            at += n


# ------------------------------------------------------------ chat templates of exports


def _exported_tokenizer(folder: Path, identity: dict, dst: Path):
    copy_tokenizer(folder, dst)
    write_chat_template(dst, identity["chat_template"])
    return transformers.AutoTokenizer.from_pretrained(str(dst))


def _prompts(template, tokenizer, sample: Sample) -> tuple[list[str], list[list[int]]]:
    """Per answer: megamft's text and ids of everything before it (segments joined, as training has them)."""
    from megamft.data.chat_templates import token_string
    from megamft.data.encoding import SegmentEncoder

    segments = template(sample, tokenizer)
    ids_by_segment = [SegmentEncoder(tokenizer).encode([[s]]).ids.tolist() for s in segments]
    texts, ids, text, so_far, before = [], [], "", [], False
    for (piece, learned, _), piece_ids in zip(segments, ids_by_segment):
        if learned and not before:
            texts.append(text)
            ids.append(list(so_far))
        before = learned
        text += piece if isinstance(piece, str) else token_string(tokenizer, piece)
        so_far += piece_ids
    return texts, ids


SAMPLES = [Sample(tuple(c)) for c in CONVERSATIONS] + [
    Sample((("user", "Say\u00a0hi."), ("assistant", "hi")))
]


@pytest.mark.parametrize("style", ["metaspace-always", "llama-legacy", "byte-level"])
@pytest.mark.parametrize("name", ["mftcoder", "chatml", "llama2"])
def test_exported_chat_template_renders_the_prompts_training_used(tmp_path, folders, name, style):
    """apply_chat_template(add_generation_prompt=True) gives training's text before every answer, and its ids
    where one encode call of the whole text gives the segments' ids (see README, chat templates of exports)."""
    tokenizer = load_tokenizer(str(folders[style]))
    template, identity = get_template(name, tokenizer)
    exported = _exported_tokenizer(folders[style], identity, tmp_path / "export")
    assert (tmp_path / "export" / CHAT_TEMPLATE_FILE).read_text() == identity["chat_template"]
    for sample in SAMPLES:
        messages = [{"role": role, "content": content} for role, content in sample.turns]
        answers = [i for i, (role, _) in enumerate(sample.turns) if role == "assistant"]
        texts, ids = _prompts(template, tokenizer, sample)
        assert len(texts) == len(answers)
        for k, index in enumerate(answers):
            prompt = exported.apply_chat_template(
                messages[:index], add_generation_prompt=True, tokenize=False
            )
            assert prompt == texts[k]
            agrees = style == "byte-level" or (name == "mftcoder" and k == 0)
            if agrees:
                tokens = exported.apply_chat_template(
                    messages[:index], add_generation_prompt=True, tokenize=True, return_dict=False
                )
                assert tokens == ids[k], (name, style, k)


def test_an_export_of_a_trained_checkpoint_carries_the_training_chat_template(tmp_path, folders):
    """preprocess -> train one step -> export: transformers' prompt is the one megamft-preprocess built."""
    import jobs

    from megamft.checkpoint.hf_convert import megatron_to_hf
    from megamft.testing.distributed import launch

    base = tmp_path / "base"  # the base model's tokenizer, with a chat template of its own (ChatML)
    shutil.copytree(folders["metaspace-always"], base)
    chatml = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
    )
    (base / CHAT_TEMPLATE_FILE).write_text(chatml)
    config = json.loads((base / "tokenizer_config.json").read_text()) | {"chat_template": chatml}
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    path = write_jsonl(tmp_path / "in.jsonl", [json.dumps(r) for r in RECORDS])
    data = tmp_path / "data"
    manifest = preprocess(
        PreprocessOptions(
            tasks={"t": [str(path)]},
            out_dir=str(data),
            tokenizer=str(base),
            template="mftcoder",
            progress=False,
        )
    )
    run_dir = tmp_path / "run"
    overrides = (
        "data.source=indexed",
        f"data.path={data}",
        "data.valid_samples_per_task=2",
        "data.seq_length=96",
        "train.train_steps=2",
        "train.micro_batch_size=2",
        "train.global_batch_size=2",
        f"checkpoint.save_dir={run_dir}",
    )
    launch(jobs.train, 1, kwargs={"overrides": overrides}, timeout=240)
    exported = megatron_to_hf(run_dir, tmp_path / "export", hf_template=base)

    trained_with = manifest["template"]["chat_template"]
    assert (exported / CHAT_TEMPLATE_FILE).read_text() == trained_with
    assert (
        json.loads((exported / "tokenizer_config.json").read_text())["chat_template"]
        == trained_with
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported))
    for record, (ids, mask) in zip(RECORDS, _documents(data, "t")):
        if "chat_rounds" not in record:
            continue
        rounds = record["chat_rounds"]
        first_answer = next(
            i for i, r in enumerate(rounds) if r["role"] in ("bot", "gpt", "assistant")
        )
        prompt = tokenizer.apply_chat_template(
            rounds[:first_answer], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert prompt == ids[: mask.index(1)]
