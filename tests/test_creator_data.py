"""Creator data: prompts, parsers, the three-stage pipeline over a real OpenAI-compatible HTTP server
(our `serve-llm` app, the official `openai` client), resume after a crash, transport errors, the
local transformers backend and the GSB judge's position swap."""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.responses import JSONResponse

from hllm.config import DataConfig
from hllm.creator.data import teacher
from hllm.creator.data.grounded import UNCHANGED
from hllm.creator.data.judge import judge_titles, parse_choice, verdict
from hllm.creator.data.llm import LLMError, LocalChat, OpenAIChat
from hllm.creator.data.llm_server import create_llm_app
from hllm.creator.data.prompts import JUDGE, POLISH, PROFILE, REWRITE, VERIFY
from hllm.creator.data.teacher import build_data, parse_interests, parse_title, parse_yes_no
from hllm.creator_config import CreatorDataConfig, LLMConfig
from hllm.errors import UserError
from tests.support import assert_one_line_error, run_cli, serving_app

INTERESTS = "- lab tools\n- electrical repair"


class ScriptedChat:
    """A deterministic stand-in for the *model* behind the real server: it answers by reading the prompt."""

    backend, model = "local", "scripted"

    def __init__(self, rewrite=lambda title: f"{title} for Lab Tools", judge=lambda a, b: "a") -> None:
        self.rewrite, self.judge = rewrite, judge
        self.calls = 0
        self.fail_after: int | None = None  # raise once this many conversations were answered
        self.delay = 0.0
        self.lock = threading.Lock()

    def chat(self, conversations, *, temperature=None, max_new_tokens=None) -> list[str]:
        time.sleep(self.delay)
        answers = []
        for conversation in conversations:
            with self.lock:
                if self.fail_after is not None and self.calls >= self.fail_after:
                    raise LLMError("the model crashed")
                self.calls += 1
            answers.append(self._answer(conversation[-1]["content"]))
        return answers

    def _answer(self, prompt: str) -> str:
        if prompt.startswith("Products this shopper bought"):
            return INTERESTS
        if "Title a:" in prompt:
            return self.judge(re.search(r"Title a: (.*)", prompt)[1], re.search(r"Title b: (.*)", prompt)[1])
        if "Answer yes or no" in prompt:
            return "no"
        return self.rewrite(re.search(r"Original title: (.*)", prompt)[1])


def openai_config(url: str, **extra) -> LLMConfig:
    return LLMConfig(backend="openai", model="scripted", base_url=f"{url}/v1", max_retries=0, **extra)


@pytest.fixture
def scientific(shared_data: Path) -> DataConfig:
    return DataConfig(path=str(shared_data / "amazon-scientific"))


SMALL = CreatorDataConfig(limit=6, chunk_rows=4, history_items=3, fact_chars=120)


def test_prompt_templates_are_versioned_and_take_exactly_their_fields():
    for prompt, fields in (
        (PROFILE, {"history"}),
        (REWRITE, {"interests", "title", "selling_points"}),
        (VERIFY, {"title", "selling_points", "new_title"}),
        (JUDGE, {"interests", "history", "selling_points", "title_a", "title_b"}),
        (POLISH, {"title"}),
    ):
        assert re.fullmatch(rf"{prompt.name}-v\d+", prompt.version)
        assert prompt.fields == fields
        chat = prompt.render(**{name: f"<{name}>" for name in fields})
        assert chat[0]["role"] == "system" and chat[-1]["role"] == "user"
        assert all(f"<{name}>" in chat[-1]["content"] for name in fields)
        with pytest.raises(ValueError, match="takes"):
            prompt.render(history="x", extra="y")


@pytest.mark.parametrize(
    "answer, interests",
    [
        ("- lab tools\n- electrical repair", ["lab tools", "electrical repair"]),
        ("1. 3D printing\n2) woodworking.\n* safety gear", ["3D printing", "woodworking", "safety gear"]),
        ("3D printing", ["3D printing"]),
        ("- lab tools\n- lab tools", ["lab tools"]),
        ("This is just a sample list of products that are sold in the shop.", None),
        ("##r ##p", None),
        ("", None),
        ("- 2019-08-22 12:30:52", None),
    ],
)
def test_parse_interests(answer, interests):
    parsed = parse_interests(answer)
    assert parsed.ok == (interests is not None)
    assert parsed.value == interests


@pytest.mark.parametrize(
    "answer, title",
    [
        ("Stainless Steel 2L Camping Pot", "Stainless Steel 2L Camping Pot"),
        ('Title: "Digital Caliper for Precise Work"\nmore text', "Digital Caliper for Precise Work"),
        ("\n\n- New title: Safety Glasses", "Safety Glasses"),
        ("Sure! Here is a title for you", None),
        ("   ", None),
        (" ".join(["word"] * 41), None),
    ],
)
def test_parse_title(answer, title):
    parsed = parse_title(answer)
    assert parsed.ok == (title is not None) and parsed.value == title


def test_parse_yes_no_and_choice():
    assert parse_yes_no("Yes, it adds a size").value == "yes" and parse_yes_no("No.").value == "no"
    assert not parse_yes_no("maybe").ok
    answers = ("a", "B.", "Title b", "(a)", "Same", "The correct answer is b. Because", "Answer: a")
    assert [parse_choice(a).value for a in answers] == ["a", "b", "b", "a", "same", "b", "a"]
    assert not parse_choice("both are good").ok
    assert not parse_choice("The answer is a, no wait, the answer is b").ok  # two statements


@pytest.mark.parametrize(
    "first, second, expected",
    [
        ("b", "a", "good"),  # candidate preferred as b, then as a
        ("a", "b", "bad"),  # original preferred in both orders
        ("a", "a", "same"),  # always the first position: position bias
        ("b", "b", "same"),  # always the second position
        ("same", "a", "same"),
        (None, "a", "same"),  # malformed after retries
    ],
)
def test_gsb_verdict_needs_both_orders_to_agree(first, second, expected):
    assert verdict(first, second) == expected


def test_build_data_over_http_keeps_faithful_titles_and_rejects_invented_claims(scientific, tmp_path):
    chat = ScriptedChat(
        rewrite=lambda title: ("Best-Selling " if len(title) % 2 else "") + f"{title} for Lab Tools"
    )
    with serving_app(create_llm_app(chat)) as url:
        report = build_data(scientific, SMALL, openai_config(url), tmp_path)
    rows = pd.read_parquet(tmp_path / "rows.parquet")
    assert (
        report["rows"] == len(rows) == 6 and report["backend"] == "openai" and report["model"] == "scripted"
    )
    assert report["prompts"] == {
        "profile": PROFILE.version,
        "rewrite": REWRITE.version,
        "verify": VERIFY.version,
    }
    claims = rows["original_title"].str.len() % 2 == 1
    assert claims.any() and (~claims).any()
    assert (rows["kept"] == ~claims).all()
    assert report["kept"] == int((~claims).sum()) and report["rejected"] == {"claim": int(claims.sum())}
    assert all(any(r.startswith("claim: best") for r in reasons) for reasons in rows.loc[claims, "reasons"])
    assert all(list(interests) == ["lab tools", "electrical repair"] for interests in rows["interests"])
    assert rows["history_item_ids"].map(len).between(1, 3).all()
    provenance = rows[["backend", "model", "profile_prompt", "rewrite_prompt"]].drop_duplicates()
    assert provenance.values.tolist() == [["openai", "scripted", PROFILE.version, REWRITE.version]]
    # The target is the user's last training item: never in its own history.
    assert all(
        item not in history for item, history in zip(rows["item_id"], rows["history_item_ids"], strict=True)
    )
    assert chat.calls == 12  # one profile per user, one rewrite per row


GROUNDED = replace(SMALL, encoder="tiny-bert")  # a tiny random encoder: the ranking is arbitrary


def test_grounded_backend_titles_every_row_from_its_item_text_without_an_llm(scientific, tmp_path):
    report = build_data(scientific, GROUNDED, LLMConfig(backend="grounded"), tmp_path)
    rows = pd.read_parquet(tmp_path / "rows.parquet")
    assert report["backend"] == "grounded" and report["model"] == "tiny-bert"
    assert report["rows"] == 6 and report["kept"] == len(rows) == 6 and report["rejected"] == {}
    assert set(rows["personalised_title"]) == set(rows["grounded_title"])
    unchanged = rows["personalised_title"] == rows["original_title"]
    assert (unchanged == (rows["template"] == UNCHANGED)).all()  # kept: the teacher's own choice
    assert rows["interests"].map(len).between(1, 3).all()
    assert not (tmp_path / "profile").exists()  # no LLM stage ran
    with pytest.raises(UserError, match="set --polish"):
        build_data(scientific, replace(GROUNDED, verify=True), LLMConfig(backend="grounded"), tmp_path / "v")


def test_grounded_v3_reads_the_interest_from_the_named_hllm_runs_user_embeddings(
    scientific, tmp_path, monkeypatch
):
    """`creator.data.interest_run`: the run's embedding of every row's user reaches the teacher (one
    embedding for all: nobody can be told apart, so every title stays the original), and the folder
    records grounded-v3 and the run."""
    from hllm import runs
    from hllm.creator import evaluate

    seen = []
    monkeypatch.setattr(runs, "load_run", lambda folder: seen.append(folder) or "run")
    monkeypatch.setattr(evaluate, "hllm_user_embeddings", lambda run, rows: np.ones((len(rows), 4)))
    settings = replace(GROUNDED, interest_run=str(tmp_path / "hllm"))
    report = build_data(scientific, settings, LLMConfig(backend="grounded"), tmp_path / "data")
    rows = pd.read_parquet(tmp_path / "data" / "rows.parquet")
    assert seen == [str(tmp_path / "hllm")] and report["rows"] == len(rows) == 6
    assert (rows["personalised_title"] == rows["original_title"]).all()
    assert report["prompts"]["rewrite"] == "grounded-v3"
    assert report["interest_run"] == str((tmp_path / "hllm").resolve())


class PolishingChat:
    """Rewords a grounded title: drops its separators, and invents a claim for every other row."""

    backend, model = "openai", "polisher"

    def __init__(self) -> None:
        self.calls = 0

    def chat(self, conversations, *, temperature=None, max_new_tokens=None) -> list[str]:
        self.calls += len(conversations)
        titles = [re.search(r"Title: (.*)", c[-1]["content"])[1] for c in conversations]
        return [("Waterproof " if i % 2 else "") + t.replace(" | ", " ") for i, t in enumerate(titles)]


def test_polish_rewords_grounded_titles_and_the_filter_still_judges_them(scientific, tmp_path, monkeypatch):
    chat = PolishingChat()
    monkeypatch.setattr(teacher, "open_chat_model", lambda config: chat)
    settings = replace(GROUNDED, polish="openai", chunk_rows=6)
    report = build_data(scientific, settings, LLMConfig(backend="grounded"), tmp_path)
    rows = pd.read_parquet(tmp_path / "rows.parquet")
    assert chat.calls == 6 and report["prompts"]["polish"] == POLISH.version
    invented = rows["personalised_title"].str.startswith("Waterproof")
    reworded = rows["personalised_title"].str.removeprefix("Waterproof ")
    assert (reworded == rows["grounded_title"].str.replace(" | ", " ")).all()
    assert invented.any() and (rows["kept"] == ~invented).all()  # no item of the sample is waterproof
    assert report["rejected"] == {"claim": int(invented.sum())}


def test_a_crash_loses_nothing_written_and_the_rerun_asks_only_the_rest(scientific, tmp_path):
    chat = ScriptedChat()
    chat.fail_after = 5  # profiles are asked 4 per part: the first part is written, the second is not
    with serving_app(create_llm_app(chat)) as url:
        with pytest.raises(UserError, match=r"profile stage, row \{'user_id': '\d+'\}: .*HTTP 500"):
            build_data(scientific, SMALL, openai_config(url), tmp_path)
        assert len(list((tmp_path / "profile").glob("part-*.parquet"))) == 1
        assert not (tmp_path / "rows.parquet").exists()
        chat.fail_after, chat.calls = None, 0
        report = build_data(scientific, SMALL, openai_config(url), tmp_path)
        assert chat.calls == 2 + 6  # the two profiles not yet written, then every rewrite
        assert report["kept"] == 6
        chat.calls = 0
        again = build_data(scientific, SMALL, openai_config(url), tmp_path)
        assert chat.calls == 0 and again["kept"] == 6  # everything was done


def test_a_folder_built_with_another_model_is_refused(scientific, tmp_path):
    with serving_app(create_llm_app(ScriptedChat())) as url:
        build_data(scientific, SMALL, openai_config(url), tmp_path)
        other = LLMConfig(backend="openai", model="other", base_url=f"{url}/v1")
        with pytest.raises(UserError, match="other settings \\(model\\)"):
            build_data(scientific, SMALL, other, tmp_path)


def test_transport_errors_are_clear(tmp_path):
    chat = ScriptedChat()
    app = create_llm_app(chat, api_key="right")
    hits = {"n": 0}

    @app.middleware("http")
    async def rate_limit_twice(request, call_next):
        hits["n"] += request.url.path.startswith("/v1/")
        if request.url.path.startswith("/v1/") and hits["n"] <= 2:
            return JSONResponse({"error": {"message": "slow down"}}, 429, headers={"retry-after-ms": "10"})
        return await call_next(request)

    conversation = [{"role": "user", "content": "Products this shopper bought: ..."}]
    with serving_app(app) as url:
        os.environ["HLLM_TEST_KEY"] = "right"
        retried = OpenAIChat(replace(openai_config(url, api_key_env="HLLM_TEST_KEY"), max_retries=2))
        assert retried.chat([conversation]) == [INTERESTS] and hits["n"] == 3
        os.environ["HLLM_TEST_KEY"] = "wrong"
        with pytest.raises(LLMError, match="refused the API key"):
            OpenAIChat(openai_config(url, api_key_env="HLLM_TEST_KEY")).chat([conversation])
        os.environ["HLLM_TEST_KEY"] = "right"
        unknown = LLMConfig(
            backend="openai", model="gpt-9", base_url=f"{url}/v1", api_key_env="HLLM_TEST_KEY"
        )
        with pytest.raises(LLMError, match="has no model 'gpt-9'"):
            OpenAIChat(unknown).chat([conversation])
        chat.delay = 1.0
        slow = openai_config(url, api_key_env="HLLM_TEST_KEY", timeout_s=0.2)
        with pytest.raises(LLMError, match=r"timed out after 0.2 s \(1 tries\)"):
            OpenAIChat(slow).chat([conversation])
        del os.environ["HLLM_TEST_KEY"]
    with pytest.raises(LLMError, match="cannot reach"):
        OpenAIChat(openai_config(url)).chat([conversation])


def test_local_backend_records_malformed_answers_and_never_writes_them_as_titles(scientific, tmp_path):
    teacher = LLMConfig(model="tiny-llama", max_new_tokens=8, batch_size=4)
    settings = CreatorDataConfig(limit=4, history_items=2, fact_chars=60)
    answers = LocalChat(teacher).chat([PROFILE.render(history="- lab glass")] * 2)
    assert len(answers) == 2 and answers[0] == answers[1]  # greedy: the same prompt, the same answer
    report = build_data(scientific, settings, teacher, tmp_path)
    rows = pd.read_parquet(tmp_path / "rows.parquet")
    profiles = pd.read_parquet(tmp_path / "profile")
    assert report["rows"] == 4 and set(profiles["status"]) <= {"ok", "failed"}
    failed = profiles[profiles["status"] == "failed"]
    assert failed["value"].isna().all() and (failed["error"] != "").all()
    assert sum(report["failed"]["profile"].values()) == len(failed)
    assert (rows["personalised_title"].str.strip() != "").all()
    assert set(rows["user_id"]) <= set(profiles.loc[profiles["status"] == "ok", "user_id"])


def _judge_rows(path: Path) -> Path:
    rows = pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u3", "u4"],
            "item_id": ["i1", "i2", "i3", "i4"],
            "interests": [["lab tools"]] * 4,
            "history": ["- Digital Caliper"] * 4,
            "selling_points": ["brand: Acme"] * 4,
            "original_title": ["Caliper", "Glass Beaker Set", "Safety Glasses", "Tape"],
            "personalised_title": [
                "Caliper for Lab Tools",
                "Beakers",
                "Safety Glasses",
                "Tape for Lab Tools",
            ],
            "kept": [True, True, True, False],
        }
    )
    rows.to_parquet(path)
    return path


def test_judge_asks_both_orders_and_cancels_position_bias(tmp_path):
    rows = _judge_rows(tmp_path / "rows.parquet")
    longer = ScriptedChat(judge=lambda a, b: "a" if len(a) > len(b) else "b")
    with serving_app(create_llm_app(longer)) as url:
        report = judge_titles(rows, tmp_path / "longer", openai_config(url))
    # u1: the candidate is longer (good); u2: shorter (bad); u3: identical (same, not asked); u4: not kept.
    assert (report["good"], report["same"], report["bad"], report["total"]) == (1, 1, 1, 3)
    assert report["adv"] == 0.0 and report["identical"] == 1 and report["position_bias"] == 0
    assert longer.calls == 4  # two rows asked, twice each
    verdicts = pd.read_parquet(tmp_path / "longer" / "verdicts.parquet").set_index("user_id")
    assert verdicts.loc["u1", ["judge-ab", "judge-ba", "verdict"]].tolist() == ["b", "a", "good"]
    assert verdicts.loc["u2", ["judge-ab", "judge-ba", "verdict"]].tolist() == ["a", "b", "bad"]

    first = ScriptedChat(judge=lambda a, b: "a")
    with serving_app(create_llm_app(first)) as url:
        report = judge_titles(rows, tmp_path / "first", openai_config(url))
        with pytest.raises(UserError, match=r"other settings \(model\)"):
            judge_titles(rows, tmp_path / "first", replace(openai_config(url), model="other"))
    assert (report["good"], report["same"], report["bad"], report["position_bias"]) == (0, 3, 0, 2)


def test_cli_build_data_errors_are_one_line(tmp_path):
    (tmp_path / "inter.csv").write_text("user_id,item_id\nu,a\nu,b\nu,c\n")
    (tmp_path / "items.csv").write_text("item_id,colour\na,red\nb,blue\nc,green\n")
    code, _, err = run_cli(
        "creator", "build-data", str(tmp_path / "inter.csv"), "--out", str(tmp_path / "out"),
        f"data.item_path={tmp_path / 'items.csv'}",
    )  # fmt: skip
    assert_one_line_error(code, err, "no title field", "items.csv")
    code, _, err = run_cli(
        "creator", "judge", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "j")
    )
    assert_one_line_error(code, err, "no such file", "missing.parquet")


def test_cli_build_data_and_judge_over_http_print_their_summaries(shared_data, tmp_path):
    with serving_app(create_llm_app(ScriptedChat(judge=lambda a, b: "a" if len(a) > len(b) else "b"))) as url:
        http = ["--backend", "openai", "--model", "scripted", "--base-url", f"{url}/v1"]
        dataset = str(shared_data / "amazon-scientific")
        code, out, err = run_cli(
            "creator", "build-data", dataset, "--out", str(tmp_path / "d"), "--limit", "3", *http
        )
        assert code == 0, err
        assert "titles kept" in out and "openai / scripted" in out
        grounded = ["--backend", "grounded", "creator.data.encoder=tiny-bert"]
        code, out, err = run_cli(
            "creator", "build-data", dataset, "--out", str(tmp_path / "g"), "--limit", "3", *grounded
        )
        assert code == 0, err
        assert "grounded / tiny-bert" in out
        rows = str(tmp_path / "d" / "rows.parquet")
        code, out, err = run_cli("creator", "judge", rows, "--out", str(tmp_path / "j"), *http)
        assert code == 0, err
        assert "Adv" in out and "+100.0%" in out  # every personalised title is the longer one
