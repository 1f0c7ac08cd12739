"""The templates (mftcoder, chatml, llama2, hf) with the new families' tokenizers: BOS and EOS are asked of each
tokenizer, as transformers reads it.

Small tokenizer.json folders are made in the style each family publishes (special-token names, whether its
post-processor puts a BOS in front, tokenizer_config.json's bos/eos): Gemma/CodeGemma (<bos> in front, <eos>),
StarCoder (<|endoftext|> for both, nothing in front), DeepSeek-V2 (its full-width begin/end-of-sentence
tokens, BOS in front), Phi-3 (<s> in front, <|endoftext|>). transformers' own tokenizer, loaded from the same
folder, is the reference for what goes in front and which id ends a sequence.
"""

import json
import shutil

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

transformers = pytest.importorskip("transformers")

from data_fixtures import CONVERSATIONS, as_line, run_preprocess, training_text  # noqa: E402

from megamft.data.tokenizer import load_tokenizer  # noqa: E402

# family -> (special tokens, BOS its post-processor puts in front or None, tokenizer_config.json's specials)
STYLES = {
    "gemma": (
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
    ),
    "starcoder": (
        ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>"],
        None,
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
    ),
    "deepseek-v2": (
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
        "<｜begin▁of▁sentence｜>",
        {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    ),
    "phi3": (
        ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "<s>",
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    ),
}


def _make(folder, style: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, bos, config = STYLES[style]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(training_text()[:3000], trainer)
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokenizer.token_to_id(bos))],
        )
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_tokenizers")
    return {style: _make(root / style, style) for style in STYLES}


@pytest.mark.parametrize("style", list(STYLES))
def test_bos_and_eos_are_what_transformers_reads(folders, style):
    ours = load_tokenizer(str(folders[style]))
    theirs = transformers.AutoTokenizer.from_pretrained(folders[style])
    plain = theirs("def f(): pass", add_special_tokens=False).input_ids
    full = theirs("def f(): pass").input_ids
    assert list(ours.prefix_ids) == full[: len(full) - len(plain)]
    assert ours.eos_id == theirs.eos_token_id


@pytest.mark.parametrize("template", ["mftcoder", "chatml", "llama2"])
@pytest.mark.parametrize("style", list(STYLES))
def test_every_template_puts_the_tokenizers_bos_and_ends_answers_with_its_eos(
    tmp_path, folders, style, template
):
    tokenizer = load_tokenizer(str(folders[style]))
    out, manifest = run_preprocess(
        tmp_path,
        {"t": [as_line(c, "messages") for c in CONVERSATIONS]},
        tokenizer=str(folders[style] / "tokenizer.json"),
        template=template,
    )
    entry = manifest["tasks"][0]
    tokens, masks = (
        IndexedDataset(str(out / entry["prefix"])),
        IndexedDataset(str(out / entry["loss_mask_prefix"])),
    )
    bos = STYLES[style][1] and tokenizer.specials[STYLES[style][1]]
    for doc, turns in enumerate(CONVERSATIONS):
        ids, mask = tokens[doc].copy(), masks[doc].copy()
        rounds = sum(role == "assistant" for role, _ in turns)
        if (
            template != "mftcoder"
        ):  # MFTCoder adds no BOS of its own: its tags' "<s>" is the one it has
            if bos is not None:
                assert int(np.sum(ids == bos)) == {"chatml": 1, "llama2": rounds}[template], (
                    style,
                    template,
                )
            assert ids.tolist()[: len(tokenizer.prefix_ids)] == list(tokenizer.prefix_ids)
        ends = np.flatnonzero(
            np.diff(np.concatenate([mask, [0]])) == -1
        )  # last learned token of each answer
        end_of_turn = (
            tokenizer.specials.get("<|im_end|>") if template == "chatml" else tokenizer.eos_id
        )
        assert len(ends) == rounds
        if end_of_turn is not None:
            assert all(ids[i] == end_of_turn for i in ends), (style, template)


def _mftcoder_ids(theirs, turns) -> list[int]:
    """A conversation as MFTCoder's preprocess_data.py encodes it, each piece by transformers' tokenizer
    without special tokens added: system "<s>system\\n{s}\\n"; per round "<s>human\\n{q}\\n<s>bot\\n", then
    "{a}\\n" and EOS, then "\\n"."""

    def encode(text):
        return theirs(text, add_special_tokens=False).input_ids

    ids = []
    for role, content in turns:
        if role == "system":
            ids += encode(f"<s>system\n{content}\n")
        elif role == "user":
            ids += encode(f"<s>human\n{content}\n<s>bot\n")
        else:
            ids += encode(f"{content}\n") + [theirs.eos_token_id] + encode("\n")
    return ids


@pytest.mark.parametrize("style", list(STYLES))
def test_mftcoder_template_encodes_as_mftcoder_with_the_tokenizer(tmp_path, folders, style):
    """The whole token sequence, not just its ends: transformers' tokenizer on MFTCoder's strings."""
    theirs = transformers.AutoTokenizer.from_pretrained(folders[style])
    out, manifest = run_preprocess(
        tmp_path,
        {"t": [as_line(c, "messages") for c in CONVERSATIONS]},
        tokenizer=str(folders[style] / "tokenizer.json"),
        template="mftcoder",
    )
    tokens = IndexedDataset(str(out / manifest["tasks"][0]["prefix"]))
    for doc, turns in enumerate(CONVERSATIONS):
        assert tokens[doc].tolist() == _mftcoder_ids(theirs, turns), (style, doc)


# Chat templates in the style of the published tokenizer_config.json files (google/codegemma-7b-it's turns,
# deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct's User:/Assistant: lines), for --template hf.
CHAT_TEMPLATES = {
    "gemma": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
        "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    "deepseek-v2": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
        "{{ 'Assistant: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
}


# What each template adds after its generation prompt for an answer: the text megamft learns.
ANSWERS = {
    "gemma": lambda answer, _: answer.strip() + "<end_of_turn>\n",
    "deepseek-v2": lambda answer, tokenizer: " " + answer + tokenizer.eos_token,
}


@pytest.mark.parametrize("style", list(CHAT_TEMPLATES))
def test_hf_template_gives_the_tokens_of_transformers_chat_template(tmp_path, folders, style):
    """--template hf: the tokens transformers' apply_chat_template gives (one BOS: the template's own), and
    learned exactly what each answer adds after the generation prompt (its end-of-turn token included)."""
    folder = tmp_path / style
    shutil.copytree(folders[style], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": CHAT_TEMPLATES[style]})
    )
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    conversations = [
        c for c in CONVERSATIONS if c[0][0] != "system"
    ]  # Gemma's template has no system turn
    out, manifest = run_preprocess(
        tmp_path,
        {"t": [as_line(c, "messages") for c in conversations]},
        tokenizer=str(folder),
        template="hf",
    )
    entry = manifest["tasks"][0]
    tokens, masks = (
        IndexedDataset(str(out / entry["prefix"])),
        IndexedDataset(str(out / entry["loss_mask_prefix"])),
    )
    for doc, turns in enumerate(conversations):
        expected = theirs.apply_chat_template(
            [{"role": r, "content": c} for r, c in turns], tokenize=True
        )
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        ids, mask = tokens[doc].tolist(), masks[doc].copy()
        assert ids == list(expected), (style, doc)
        edges = np.diff(np.concatenate([[0], mask, [0]]))
        learned = [
            theirs.decode(ids[a:b])
            for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))
        ]
        assert learned == [ANSWERS[style](c, theirs) for r, c in turns if r == "assistant"], (
            style,
            doc,
        )
