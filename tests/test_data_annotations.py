"""Annotation readers, answer tables, missing images, tokenizer and the data configuration."""

import json
import re

import numpy as np
import pytest

from semvlp.data.annotations import (
    AnnotationError,
    AnswerTable,
    MissingImagesError,
    check_images,
    load_flickr30k,
    load_gqa,
    load_nlvr2,
    load_pretrain_annotations,
    load_vqa,
    normalize_answer,
    require_labels,
)
from semvlp.data.config import DataConfig, PretrainData, QAData
from semvlp.data.tokenizer import load_tokenizer, replacement_token_ids, tokenize_texts


def dump(path, data):
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("Two", "2"),
        ("a man", "man"),
        ("The Woman", "woman"),
        ("grey", "gray"),
        ("yes.", "yes"),
        ("an apple", "apple"),
        ("the red car", "red car"),
        ("", ""),
        ("ten", "10"),
        ("net", "net"),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_answer_tables(tmp_path):
    all_ans = dump(
        tmp_path / "all_ans.json",
        [{"ans": "yes", "dsets": ["vqa", "gqa"]}, {"ans": "net", "dsets": ["vqa"]}, {"ans": "pipe", "dsets": ["gqa"]}],
    )
    assert AnswerTable.from_all_ans(all_ans).answers == ["yes", "net", "pipe"]
    assert AnswerTable.from_all_ans(all_ans, dsets=["gqa"]).answers == ["yes", "pipe"]
    assert AnswerTable.load(all_ans).ans2id("pipe") == 2
    a2l = dump(tmp_path / "a2l.json", {"no": 1, "yes": 0})
    l2a = dump(tmp_path / "l2a.json", ["yes", "no"])
    assert AnswerTable.load(a2l).answers == AnswerTable.load(l2a).answers == ["yes", "no"]
    table = AnswerTable(["yes", "2", "man"])
    assert table.label_ids({"Two": 0.3, "a man": 1.0, "unknown": 0.9}) == {1: 0.3, 2: 1.0}
    assert table.label_ids({"Two": 0.3}, normalize=False) == {}
    assert table.label_ids({"two": 0.6, "2": 0.9}) == {1: 0.9}  # one table answer: the better score, not a sum
    with pytest.raises(AnnotationError, match="labels must be distinct"):
        AnswerTable.load(dump(tmp_path / "bad.json", {"yes": 0, "no": 0}))
    with pytest.raises(AnnotationError, match="record 1 has no field 'ans'"):
        AnswerTable.from_all_ans(dump(tmp_path / "bad2.json", [{"ans": "x"}, {"answer": "y"}]))


def test_a_qa_sections_two_answer_tables_must_agree(tmp_path):
    """label2ans alone was read, and an ans2label that disagreed with it was ignored (LXMERT asserts they agree)."""
    a2l, l2a = dump(tmp_path / "a2l.json", {"no": 1, "yes": 0}), dump(tmp_path / "l2a.json", ["yes", "no"])
    assert QAData(ans2label=str(a2l), label2ans=str(l2a)).load_answer_table("vqa").answers == ["yes", "no"]
    assert QAData(ans2label=str(a2l)).load_answer_table("vqa").answers == ["yes", "no"]
    for answers, says in ((["no", "yes"], "label 0 ('no' and 'yes'; 2 and 2 answers)"),
                          (["yes", "no", "2"], "label 2 ('2' and nothing; 3 and 2 answers)")):  # fmt: skip
        l2a = dump(tmp_path / "l2a.json", answers)
        with pytest.raises(AnnotationError, match=re.escape(f"'vqa' section: {l2a} and {a2l} disagree at {says}")):
            QAData(ans2label=str(a2l), label2ans=str(l2a)).load_answer_table("vqa")


def pretrain_records():
    return [
        {
            "img_id": "i0",
            "sentf": {"mscoco": ["a dog .", "a cat ."], "vqa": ["how many dogs ?"]},
            "labelf": {"vqa": [{"Two": 0.6, "three": 0.3}]},
        },
        {
            "img_id": "i1",
            "sentf": {"vg": ["a tree ."], "vqa": ["what is it ?", "is it red ?"]},
            "labelf": {"vqa": [{"unknown answer": 1.0}, {"yes": 1.0}]},
        },
    ]


def test_pretrain_annotations(tmp_path):
    f = dump(tmp_path / "p.json", pretrain_records())
    table = AnswerTable(["yes", "no", "2", "3"])
    c = load_pretrain_annotations([f], sources=("mscoco", "vqa"), answer_table=table)
    assert c.texts == ["a dog .", "a cat .", "how many dogs ?", "what is it ?", "is it red ?"]
    assert c.image_ids == ["i0", "i1"] and c.sent_image.tolist() == [0, 0, 0, 1, 1]
    assert c.uid(2) == "i0_vqa_000" and c.uid(4) == "i1_vqa_001"
    assert c.source_counts == {"mscoco": 2, "vqa": 3}
    ids, scores = c.answers(2)  # normalized ("Two" -> "2") and looked up
    assert dict(zip(ids.tolist(), scores.tolist(), strict=True)) == pytest.approx({2: 0.6, 3: 0.3})
    assert len(c.answers(0)[0]) == 0 and len(c.answers(3)[0]) == 0  # a caption; an answer not in the table
    assert c.answers(4)[0].tolist() == [0]
    sub = c.select(np.array([False, False, True, False, True]))
    assert sub.texts == ["how many dogs ?", "is it red ?"] and sub.answers(1)[0].tolist() == [0]
    assert sub.answers(0)[0].tolist() == [2, 3]
    no_table = load_pretrain_annotations([f], sources=("vqa",))
    assert len(no_table) == 3 and len(no_table.qa_answers) == 0

    bad = pretrain_records()
    bad[1]["labelf"]["vqa"] = [{"yes": 1.0}]
    with pytest.raises(AnnotationError, match=r"p2.json: record 1 \(img_id i1\) field 'labelf.vqa'"):
        load_pretrain_annotations([dump(tmp_path / "p2.json", bad)], answer_table=table)
    with pytest.raises(AnnotationError, match=r"p3.json: record 0 has no field 'sentf'"):
        load_pretrain_annotations([dump(tmp_path / "p3.json", [{"img_id": "x"}])])
    (tmp_path / "p4.json").write_text('[{"img_id": "x",\n "sentf": }]')
    with pytest.raises(AnnotationError, match="p4.json: invalid JSON at line 2"):
        load_pretrain_annotations([tmp_path / "p4.json"])


@pytest.mark.parametrize("score", [10, -0.3, "high", float("nan"), True])
def test_pretrain_label_scores_are_checked_when_loaded(tmp_path, score):
    """A bad score failed only when its sentence was first drawn (maybe hours in), or was clamped to 0."""
    records = pretrain_records()
    records[1]["labelf"]["vqa"][1] = {"yes": score}
    path = dump(tmp_path / "p.json", records)
    with pytest.raises(AnnotationError, match=r"p.json: record 1 \(img_id i1\) field 'labelf.vqa\[1\]' answer 'yes' "
                                              r"has score .*; scores must be numbers in \[0, 1\]"):  # fmt: skip
        load_pretrain_annotations([path], answer_table=AnswerTable(["yes", "no"]))


def test_pretrain_answers_scored_zero_are_no_targets(tmp_path):
    """Answers are drawn in proportion to their scores: one scored 0 is never drawn, and a label whose
    answers all score 0 (LXMERT divides by zero there) leaves its sentence without a QA target."""
    records = pretrain_records()
    records[1]["labelf"]["vqa"] = [{"yes": 0, "no": 0.0}, {"yes": 0, "no": 0.3}]
    corpus = load_pretrain_annotations([dump(tmp_path / "p.json", records)], answer_table=AnswerTable(["yes", "no"]))
    question = [i for i in range(len(corpus)) if corpus.uid(i).startswith("i1_vqa")]
    assert len(corpus.answers(question[0])[0]) == 0
    ids, scores = corpus.answers(question[1])
    assert ids.tolist() == [1] and scores.tolist() == pytest.approx([0.3])


@pytest.mark.parametrize("load", [load_vqa, load_gqa])
@pytest.mark.parametrize("score", [10, -0.3, "high", float("nan"), True])
def test_finetune_label_scores_must_be_soft_scores(tmp_path, load, score):
    """Annotator counts as scores trained with BCE targets of 10 (the score cap was reported as 10)."""
    questions = [
        {"question_id": 6, "img_id": "a", "sent": "s", "label": {"yes": 1.0}},
        {"question_id": 7, "img_id": "a", "sent": "s", "label": {"no": 0.3, "yes": score}},
    ]
    with pytest.raises(AnnotationError, match=r"q.json: record 1 \(question_id 7\) field 'label' answer 'yes' "
                                              r"has score .*; scores must be numbers in \[0, 1\]"):  # fmt: skip
        load(dump(tmp_path / "q.json", questions))


def test_finetune_readers(tmp_path):
    vqa = dump(
        tmp_path / "vqa.json",
        [{"question_id": 458752000, "img_id": "COCO_1", "sent": "What is this?", "label": {"net": 1, "pipe": 0.3}}],
    )
    test = dump(tmp_path / "test.json", [{"question_id": 458752001, "img_id": "COCO_1", "sent": "Why?"}])
    q = load_vqa([vqa, test])
    assert q[0].label == {"net": 1.0, "pipe": 0.3} and q[1].label is None and q[0].question_id == 458752000
    assert (q[0].file, q[1].file) == (str(vqa), str(test))
    gqa = load_gqa(
        [
            dump(
                tmp_path / "gqa.json",
                [{"question_id": "07333408", "img_id": "2375429", "sent": "Is it?", "label": {"yes": 1.0}}],
            )
        ]
    )
    assert gqa[0].question_id == "07333408"
    with pytest.raises(AnnotationError, match=r"record 0 \(question_id 1\) field 'label'"):
        load_vqa(dump(tmp_path / "bad.json", [{"question_id": 1, "img_id": "a", "sent": "s", "label": ["x"]}]))
    nl = load_nlvr2(
        dump(
            tmp_path / "n.json",
            [{"identifier": "train-1-0-0", "img0": "a-img0", "img1": "a-img1", "sent": "s", "label": 1}],
        )
    )
    assert (nl[0].img0, nl[0].label) == ("a-img0", 1)
    with pytest.raises(AnnotationError, match=r"record 0 \(identifier x\) field 'label' must be 0 or 1"):
        load_nlvr2(dump(tmp_path / "n2.json", [{"identifier": "x", "img0": "a", "img1": "b", "sent": "s", "label": 2}]))
    karpathy = dump(
        tmp_path / "dataset_flickr30k.json",
        {
            "images": [
                {
                    "filename": "1000092795.jpg",
                    "imgid": 0,
                    "split": "train",
                    "sentences": [{"raw": "A.", "tokens": ["a"]}],
                },
                {
                    "filename": "10002456.jpg",
                    "imgid": 1,
                    "split": "test",
                    "sentences": [{"raw": "B.", "tokens": ["b"]}, {"raw": "C.", "tokens": ["c"]}],
                },
                {"filename": "1001.jpg", "imgid": 2, "split": "test", "sentences": [{"raw": "D.", "tokens": ["d"]}]},
            ]
        },
    )
    r = load_flickr30k(karpathy, "test")
    assert r.image_ids == ["10002456", "1001"] and r.captions == ["B.", "C.", "D."]
    assert r.caption_image.tolist() == [0, 0, 1]
    sub = r.select_images(np.array([False, True]))
    assert sub.image_ids == ["1001"] and sub.captions == ["D."] and sub.caption_image.tolist() == [0]
    with pytest.raises(AnnotationError, match="no images in split"):
        load_flickr30k(karpathy, "val")


def test_labels_are_all_or_none_per_file_and_needed_in_train_and_dev_splits(tmp_path):
    """A split without labels trained until the first step (KeyError 'answer_targets') or dev
    evaluation (KeyError, TypeError in the metric); the launchers now stop before the run folder."""
    labeled = {"identifier": "a", "img0": "x", "img1": "y", "sent": "s", "label": 1}
    unlabeled = {**labeled, "identifier": "b", "label": None}  # null reads as no label, as LXMERT's test files
    with pytest.raises(AnnotationError, match=r"mix.json: record 0 \(identifier a\) has a label but record 1 "
                                              r"\(identifier b\) has none; a file's statements must all have "
                                              r"one \(train and dev files\) or none \(test files\)$"):  # fmt: skip
        load_nlvr2(dump(tmp_path / "mix.json", [labeled, unlabeled]))
    question = {"question_id": 1, "img_id": "x", "sent": "s"}
    with pytest.raises(AnnotationError, match=r"record 0 \(question_id 1\) has a label but record 1 \(question_id 2\)"):
        load_gqa(dump(tmp_path / "mixq.json", [{**question, "label": {}}, {**question, "question_id": 2}]))

    dev, test = dump(tmp_path / "dev.json", [labeled]), dump(tmp_path / "test.json", [unlabeled])
    require_labels(load_nlvr2([dev]), "nlvr2 valid", "statement")
    with pytest.raises(AnnotationError) as e:
        require_labels(load_nlvr2([dev, test]), "nlvr2 valid", "statement")
    assert str(e.value) == (f"nlvr2 valid ({test}): no statement has a label; train and dev files need them "
                            "(only test files may have none)")  # fmt: skip


@pytest.mark.parametrize("where", ["vqa", "nlvr2", "flickr30k"])
@pytest.mark.parametrize("text", ["", " \t", "\u200b\ufeff"])
def test_blank_questions_statements_and_captions_are_named(tmp_path, where, text):
    """They were read silently, and trained on as [CLS] [SEP] alone (zero-width characters too:
    the tokenizer deletes them)."""
    if where == "vqa":
        data, load = [{"question_id": 7, "img_id": "x", "sent": text}], load_vqa
        field = r"record 0 \(question_id 7\) field 'sent'"
    elif where == "nlvr2":
        data, load = [{"identifier": "n", "img0": "x", "img1": "y", "sent": text}], load_nlvr2
        field = r"record 0 \(identifier n\) field 'sent'"
    else:
        data = {"images": [{"filename": "1.jpg", "split": "test", "sentences": [{"raw": text}]}]}
        load, field = load_flickr30k, r"images\[0\] \(1.jpg\) sentences\[0\] field 'raw'"
    with pytest.raises(AnnotationError, match=rf"f.json: {field} holds no text \({re.escape(repr(text))}\)$"):
        load(dump(tmp_path / "f.json", data))


def test_blank_pretraining_sentences_are_left_out_with_a_warning(tmp_path, caplog):
    """Noisy sources (Visual Genome's region descriptions) may hold a few: one must not stop a run."""
    path = dump(tmp_path / "f.json", [{"img_id": "x", "sentf": {"mscoco": ["", "a dog .", " \t"]}}])
    corpus = load_pretrain_annotations([path], ("mscoco",))
    assert corpus.texts == ["a dog ."] and corpus.uid(0) == "x_mscoco_001" and corpus.source_counts == {"mscoco": 1}
    assert f"2 blank pre-training sentence(s) left out, e.g. {path} record 0 (img_id x) sentf.mscoco[0]" in caplog.text


def test_files_that_are_not_utf8_are_named(tmp_path):
    """Python's UnicodeDecodeError named neither the file nor the line ('vqa valid: 'utf-8' codec ...')."""
    text = json.dumps([{"question_id": 1, "img_id": "x", "sent": "caf\u00e9 ?"}], ensure_ascii=False, indent=1)
    (tmp_path / "vqa.json").write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(AnnotationError, match=rf"vqa.json: not UTF-8 text: byte 0xe9 at offset {offset} \(line 5\): "
                                              "invalid continuation byte; save the file as UTF-8"):  # fmt: skip
        load_vqa(tmp_path / "vqa.json")
    (tmp_path / "data.json").write_bytes('{"stores": ["caf\u00e9.h5"], "vocab": "v"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{tmp_path}/data.json: not UTF-8 text: byte 0xe9 at offset 16 \(line 1\)"):
        DataConfig.load(tmp_path / "data.json")


def test_missing_images():
    ids = ["a", "b", "x1", "a", "x2", "x3", "x4", "x5", "x6", "x7"]
    with pytest.raises(MissingImagesError) as e:
        check_images(ids, {"a", "b"}, "VQA annotations")
    msg = str(e.value)
    assert "7 images missing" in msg and "['x1', 'x2', 'x3', 'x4', 'x5']" in msg and "x6" not in msg
    assert "pass --skip_missing (skip_missing=True in code) to drop them" in msg  # the launchers' spelling
    keep = check_images(ids, {"a", "b"}, "VQA annotations", skip_missing=True)
    assert keep.tolist() == [True, True, False, True] + [False] * 6
    # given each entry's annotation file, the error names the files holding missing images, once each
    files = ["train.json"] * 2 + ["dev.json"] * 3 + ["test.json"] * 5
    with pytest.raises(MissingImagesError, match=r"^VQA annotations \(dev.json, test.json\): 7 images missing"):
        check_images(ids, {"a", "b"}, "VQA annotations", files=files)


def test_tokenizer(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "a", "red", "car", "?"]))
    tok = load_tokenizer(vocab)
    assert len(tok) == 10 and load_tokenizer(tmp_path).vocab_size == 10  # a folder holding vocab.txt works
    ids, offsets = tokenize_texts(tok, ["A red CAR ?", "a a a a a a", "car"], max_len=5)
    rows = [ids[offsets[i] : offsets[i + 1]].tolist() for i in range(3)]
    assert rows == [[2, 6, 7, 8, 3], [2, 6, 6, 6, 3], [2, 8, 3]]  # truncated to 5 with [CLS]/[SEP]
    assert replacement_token_ids(tok).tolist() == [6, 7, 8, 9]
    (tmp_path / "tiny.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(ValueError, match="only 5 tokens"):
        load_tokenizer(tmp_path / "tiny.txt")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "none.txt")


def test_tokenizer_needs_the_special_tokens_in_the_vocab_file(tmp_path):
    """transformers adds missing special tokens itself, so the vocab loaded and then failed ('WordPiece
    error: Missing [UNK] token', not naming the file) at the first unknown word."""
    no_unk = tmp_path / "no_unk.txt"
    no_unk.write_text("\n".join(["[PAD]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "car"]) + "\n")
    with pytest.raises(ValueError, match=r"no_unk.txt lacks the special tokens \['\[UNK\]'\]"):
        load_tokenizer(no_unk)
    words = tmp_path / "words.txt"
    words.write_text("\n".join(["a", "red", "car", "on", "the", "sand"]))
    with pytest.raises(ValueError, match=r"words.txt lacks the special tokens \['\[PAD\]', '\[UNK\]', '\[CLS\]'"):
        load_tokenizer(words)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("[PAD]\n[UNK]\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="vocab .*latin1.txt is not UTF-8 text"):
        load_tokenizer(latin1)


def test_data_config(tmp_path):
    cfg_file = dump(
        tmp_path / "data.json",
        {
            "stores": ["feats/a.h5", "/abs/b.h5"],
            "vocab": "vocab.txt",
            "num_object_labels": 24,
            "pretrain": {"train": ["p.json"], "sources": ["mscoco", "vqa"], "answer_table": "all_ans.json"},
            "flickr30k": {"annotations": "k.json"},
        },
    )
    cfg = DataConfig.load(cfg_file)
    assert cfg.stores == (str(tmp_path / "feats/a.h5"), "/abs/b.h5")
    assert cfg.pretrain == PretrainData(
        train=(str(tmp_path / "p.json"),), sources=("mscoco", "vqa"), answer_table=str(tmp_path / "all_ans.json")
    )
    assert cfg.num_object_labels == 24 and cfg.num_attribute_labels == 400 and cfg.vqa is None
    assert cfg.flickr30k.test_splits == ("test",)
    cfg.save(tmp_path / "copy.json")
    saved = json.loads((tmp_path / "copy.json").read_text())
    assert saved["stores"] == ["feats/a.h5", "/abs/b.h5"] and saved["pretrain"]["train"] == ["p.json"]
    assert DataConfig.load(tmp_path / "copy.json") == cfg

    def load(data):
        return DataConfig.load(dump(tmp_path / "x.json", data))

    with pytest.raises(ValueError, match=r"unknown key\(s\) pretrain.trian"):
        load({"stores": ["a"], "vocab": "v", "pretrain": {"trian": ["p"]}})
    with pytest.raises(ValueError, match="unknown key"):
        load({"stores": ["a"], "vocab": "v", "extra": 1})
    with pytest.raises(ValueError, match="max_text_len: expected an integer"):
        load({"stores": ["a"], "vocab": "v", "max_text_len": "20"})
    with pytest.raises(ValueError, match="stores: expected a list"):
        load({"stores": "a.h5", "vocab": "v"})
    with pytest.raises(ValueError, match="missing required key"):
        load({"stores": ["a"]})
    with pytest.raises(ValueError, match=r"x.json: DataConfig.num_object_labels must be >= 1, got 0"):
        load({"stores": ["a"], "vocab": "v", "num_object_labels": 0})
    with pytest.raises(ValueError, match=r"x.json: DataConfig.num_attribute_labels must be >= 1, got -5"):
        load({"stores": ["a"], "vocab": "v", "num_attribute_labels": -5})


def test_data_config_must_be_a_file(tmp_path):
    """--data given a folder failed with an IsADirectoryError traceback (exit 1)."""
    with pytest.raises(ValueError, match=rf"{tmp_path} is a folder; the data configuration \(--data\) must be a "
                                         r"data.json file$"):  # fmt: skip
        DataConfig.load(tmp_path)
    dump(tmp_path / "data.json", {"stores": ["a.h5"], "vocab": "v"})
    with pytest.raises(ValueError, match=rf"must be a data.json file \(this folder holds {tmp_path}/data.json\)"):
        DataConfig.load(tmp_path)
