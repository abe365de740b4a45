"""`rag train ...`: tokenizer, prepare (corpus -> token files), lm (pretraining), sft, dpo, reward, ppo,
and the data commands reader-data, span-data and pairs (citation preference pairs).

Thin wrappers over rag.llm.{tokenizer,data,train,align}. Every training command also runs under
`torchrun --nproc_per_node=N -m rag.llm.cli <command> ...`: DDP, or FSDP with --parallel fsdp.
Defaults need nothing but the public data in RAG_SHARED_DATA: `rag train lm --preset tiny` trains a
tokenizer on tinyshakespeare, tokenizes it and pretrains the tiny model on CPU in a few minutes.
"""

from __future__ import annotations

import json
import os
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rag.llm.checkpoint import CheckpointError
from rag.llm.data import DataError, prepare_corpus, resolve_corpus
from rag.preference_data import DEFAULT_CHUNK_WORDS, DEFAULT_PAIR_SOURCES
from rag.reader_data import DEFAULT_ABSTAIN, DEFAULT_MAX_TOKENS, DEFAULT_SOURCES

app = typer.Typer(no_args_is_help=True)
console = Console(stderr=True)

Preset = Annotated[
    str, typer.Option(help="Training + model preset: tiny (CPU, seconds) or default (GPU reader).")
]
Out = Annotated[
    Path | None, typer.Option("--out", help="Run directory (checkpoint, metrics.jsonl, loss_curve.png).")
]
MaxSteps = Annotated[int | None, typer.Option(help="Optimizer steps (the preset's if unset).")]
MaxTokens = Annotated[int | None, typer.Option(help="Token budget; sets max steps from tokens per step.")]
BatchSize = Annotated[int | None, typer.Option(help="Micro-batch per rank.")]
Lr = Annotated[float | None, typer.Option(help="Peak learning rate.")]
Resume = Annotated[
    bool, typer.Option(help="Continue the run in --out exactly where its checkpoint left off.")
]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Parallel = Annotated[
    str | None,
    typer.Option(
        help="Under torchrun: ddp (every rank holds the whole model) or fsdp (parameters, gradients "
        "and AdamW state sharded over the ranks; see docs/scaling.md)."
    ),
]
Sets = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override any TrainConfig field, KEY=VALUE (JSON value), e.g. grad_accum=4; "
        "model.KEY=VALUE overrides a ModelConfig field, e.g. model.n_layer=4.",
    ),
]


def _friendly(fn):
    """Known user errors become one red line and exit code 1 instead of a traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError, DataError, CheckpointError) as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(1) from e

    return wrapper


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _config(preset: str, sets: list[str] | None, **given):
    """TrainConfig from a preset, then the explicit options that were given, then --set overrides."""
    from rag.llm.train import TRAIN_PRESETS, TrainConfig

    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(TRAIN_PRESETS)}")
    values = {**TRAIN_PRESETS[preset], **{k: v for k, v in given.items() if v is not None}}
    overrides = dict(values.pop("model_overrides", {}))
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if key.startswith("model."):
            overrides[key.removeprefix("model.")] = _parse_value(raw)
        else:
            values[key] = _parse_value(raw)
    return TrainConfig.from_dict({**values, "model_overrides": overrides})


def _report(result, out_dir) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 speaks
        return
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    console.print(
        f"step {result.step}: train loss {result.train_loss:.4f}, val loss {val}; checkpoint in {out_dir}"
    )


@app.command()
@_friendly
def tokenizer(
    corpus: Annotated[list[str] | None, typer.Option(help="Corpus name or file (repeatable).")] = None,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size (< 65536 for uint16 token files).")] = 8192,
    out: Annotated[Path, typer.Option(help="Where to write tokenizer.json.")] = Path(".data/tokenizer.json"),
    max_chars: Annotated[int | None, typer.Option(help="Train on at most this many characters.")] = None,
) -> None:
    """Train the byte-level BPE tokenizer on corpus text."""
    from rag.llm.tokenizer import train_tokenizer

    paths = [p for name in corpus or ["tinyshakespeare"] for p in resolve_corpus(name)[0]]
    tok = train_tokenizer(paths, out, vocab_size=vocab_size, max_chars=max_chars)
    console.print(f"tokenizer with {tok.vocab_size} tokens written to {out}")


@app.command()
@_friendly
def prepare(
    corpus: Annotated[str, typer.Option(help="tinyshakespeare, wikitext-2, gutenberg, or a file/folder.")] = (
        "tinyshakespeare"
    ),
    tokenizer_path: Annotated[
        Path, typer.Option("--tokenizer", help="tokenizer.json to encode with.")
    ] = Path(".data/tokenizer.json"),
    out: Annotated[Path | None, typer.Option(help="Output folder (default .data/<corpus>).")] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(
            help="Share of text held out when the corpus has no val file (default: the corpus's, else 0.01)."
        ),
    ] = None,
) -> None:
    """Tokenize a corpus into memory-mapped uint16 train.bin / val.bin (+ meta.json, tokenizer.json)."""
    from rag.llm.tokenizer import Tokenizer

    train, val, share = resolve_corpus(corpus)
    out = out or Path(".data") / Path(corpus).name.split(".")[0]
    meta = prepare_corpus(
        train, Tokenizer.load(tokenizer_path), out, val_paths=val, val_fraction=val_fraction or share
    )
    console.print(f"{out}: {meta['n_tokens']['train']:,} train / {meta['n_tokens']['val']:,} val tokens")


def ensure_data(corpus: str, vocab_size: int, prepare: bool) -> Path:
    """.data/<corpus>-v<vocab>, made on first use if `prepare` (a tokenizer trained on it, then tokenized)."""
    from rag.llm.tokenizer import train_tokenizer

    data_dir = Path(".data") / f"{Path(corpus).name.split('.')[0]}-v{vocab_size}"
    if prepare and not (data_dir / "meta.json").is_file():
        train, val, share = resolve_corpus(corpus)
        console.print(f"preparing {data_dir} (tokenizer with {vocab_size} tokens on {corpus}) ...")
        tok = train_tokenizer(
            train, data_dir / "tokenizer.json", vocab_size=vocab_size, max_chars=200_000_000
        )
        prepare_corpus(train, tok, data_dir, val_paths=val, val_fraction=share)
    return data_dir


@app.command()
@_friendly
def lm(
    preset: Preset = "tiny",
    data: Annotated[
        Path | None, typer.Option(help="A `rag train prepare` folder; default: made from --corpus.")
    ] = None,
    corpus: Annotated[
        str | None,
        typer.Option(help="Corpus when --data is unset (tiny: tinyshakespeare, default: gutenberg)."),
    ] = None,
    vocab_size: Annotated[int | None, typer.Option(help="Tokenizer size when --data is unset.")] = None,
    out: Out = None,
    max_steps: MaxSteps = None,
    max_tokens: MaxTokens = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    resume: Resume = False,
    device: Device = "auto",
    parallel: Parallel = None,
    sets: Sets = None,
) -> None:
    """Pretrain the decoder LM from scratch (DDP or FSDP under torchrun)."""
    import torch.distributed as dist

    from rag.llm.train import setup_runtime, shutdown_runtime, train_lm

    given = dict(
        max_steps=max_steps,
        max_tokens=max_tokens,
        batch_size=batch_size,
        lr=lr,
        resume=resume,
        parallel=parallel,
    )
    out = out or Path("runs") / f"lm-{preset}"
    cfg = _config(preset, sets, data_dir=data and str(data), out_dir=str(out), device=device, **given)
    rt = setup_runtime(cfg.device)
    if data is None and not any(s.startswith("data_dir=") for s in sets or []):
        corpus = corpus or ("tinyshakespeare" if preset == "tiny" else "gutenberg")
        vocab = vocab_size or (2048 if preset == "tiny" else 8192)
        cfg.data_dir = str(ensure_data(corpus, vocab, prepare=rt.main))  # rank 0 prepares, the rest wait
        if rt.ddp:
            dist.barrier()
    try:
        _report(train_lm(cfg, rt), cfg.out_dir)
    finally:
        shutdown_runtime()


Init = Annotated[Path, typer.Option("--init", help="Checkpoint to start from (e.g. runs/lm-default).")]
ValData = Annotated[Path | None, typer.Option(help="Held-out JSONL (else a fraction of --data).")]


AlignData = Annotated[
    Path,
    typer.Option(help='JSONL rows: {"prompt", "answer"} for sft, {"prompt", "chosen", "rejected"} for dpo.'),
]


def _align_command(kind: str, doc: str) -> None:
    """Register `rag train sft` / `dpo`: the same options, another objective (DPO's beta: --set beta=)."""

    def command(
        data: AlignData,
        init: Init,
        preset: Preset = "tiny",
        val_data: ValData = None,
        out: Out = None,
        max_steps: MaxSteps = None,
        batch_size: BatchSize = None,
        lr: Lr = None,
        resume: Resume = False,
        device: Device = "auto",
        parallel: Parallel = None,
        sets: Sets = None,
    ) -> None:
        from rag.llm.align import train_dpo, train_sft
        from rag.llm.train import shutdown_runtime

        given = dict(
            max_steps=max_steps, batch_size=batch_size, lr=lr, resume=resume, device=device, parallel=parallel
        )
        paths = dict(data_dir=str(data), val_data=val_data and str(val_data), init_from=str(init))
        cfg = _config(preset, sets, out_dir=str(out or Path("runs") / f"{kind}-{preset}"), **paths, **given)
        try:
            _report((train_sft if kind == "sft" else train_dpo)(cfg), cfg.out_dir)
        finally:
            shutdown_runtime()

    command.__doc__ = doc
    app.command(kind)(_friendly(command))


_align_command("sft", "Supervised fine-tuning: loss on answer tokens only.")
_align_command(
    "dpo", "Direct preference optimisation against a frozen copy of --init (temperature: --set beta=0.1)."
)


def _prompt_budget(
    model: Path | None, max_new_tokens: int | None, tokenizer_path: Path | None, max_tokens: int | None
):
    """(tokenizer, prompt budget) of --model (its context minus the answer room), else of --tokenizer
    and --max-tokens: reader rows and preference pairs are sized as `rag ask` sizes prompts."""
    from rag.llm.tokenizer import Tokenizer
    from rag.reader_data import load_reader

    if model is not None:
        if tokenizer_path is not None or max_tokens is not None:
            raise ValueError(
                "--model sets the tokenizer and the prompt budget: drop --tokenizer / --max-tokens"
            )
        reader, max_tokens = load_reader(model, "cpu", max_new_tokens)
        return reader.tokenizer, max_tokens
    if tokenizer_path is None:
        raise ValueError(
            "give --model DIR (a checkpoint: its tokenizer and context size the prompts) "
            "or --tokenizer PATH (with --max-tokens)"
        )
    if max_new_tokens is not None:
        raise ValueError(
            "--max-new-tokens needs --model; without one, set the prompt budget with --max-tokens"
        )
    return Tokenizer.load(tokenizer_path), max_tokens or DEFAULT_MAX_TOKENS


@app.command("reader-data")
@_friendly
def reader_data(
    squad: Annotated[
        Path, typer.Option(help="SQuAD v1.1 JSON (.json or .json.gz), e.g. train-v1.1.json.gz.")
    ],
    out: Annotated[Path, typer.Option(help="JSONL file to write (rows for `rag train sft`).")],
    model: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint to build for (the LM to fine-tune, or a reader): its tokenizer, and prompts "
            "of its context minus --max-new-tokens, as `rag ask` and `rag eval reader` size them."
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            min=1, help="With --model: answer room left out of its context (default: the reader's)."
        ),
    ] = None,
    tokenizer_path: Annotated[
        Path | None,
        typer.Option("--tokenizer", help="Without --model: tokenizer.json, or a folder holding one."),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(min=16, help=f"Without --model: the prompt budget (default {DEFAULT_MAX_TOKENS})."),
    ] = None,
    sources: Annotated[
        int,
        typer.Option(
            min=1, help="Most sources per prompt (gold + distractors); each row draws 1 to this many."
        ),
    ] = DEFAULT_SOURCES,
    abstain: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of rows without the gold, answered by abstaining.")
    ] = DEFAULT_ABSTAIN,
    limit: Annotated[int | None, typer.Option(min=1, help="Use a seeded sample of N questions.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of distractors, positions, abstention, sample.")] = 0,
) -> None:
    """Reader SFT rows from SQuAD: numbered sources (gold + distractors) -> cited answer or abstention."""
    from rag.reader_data import write_reader_data

    tokenizer, max_tokens = _prompt_budget(model, max_new_tokens, tokenizer_path, max_tokens)
    stats = write_reader_data(
        squad,
        tokenizer,
        out,
        limit=limit,
        progress=True,
        sources=sources,
        abstain=abstain,
        max_tokens=max_tokens,
        seed=seed,
    ).to_dict()
    skipped = ", ".join(f"{k} {v}" for k, v in stats["skipped"].items()) or "none"
    console.print(
        f"{out}: {stats['rows']:,} rows from {stats['questions']:,} questions "
        f"({stats['answerable']:,} answerable, {stats['abstain']:,} abstain); skipped: {skipped}\n"
        f"prompts of at most {max_tokens} tokens; sources per row {stats['sources']}, "
        f"gold position {stats['gold_positions']}, {stats['fewer_sources']:,} rows with fewer "
        "sources than drawn (budget)",
        highlight=False,
    )


@app.command("pairs")
@_friendly
def pairs(
    squad: Annotated[
        Path, typer.Option(help="SQuAD v1.1 JSON (.json or .json.gz), e.g. train-v1.1.json.gz.")
    ],
    out: Annotated[
        Path, typer.Option(help="JSONL file to write (rows for `rag train sft`, `dpo`, `reward`, `ppo`).")
    ],
    model: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint to build for: its tokenizer, and prompts of its context minus --max-new-tokens."
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="With --model: answer room left out of its context.")
    ] = None,
    tokenizer_path: Annotated[
        Path | None, typer.Option("--tokenizer", help="Without --model: tokenizer.json.")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(min=16, help="Without --model: the prompt budget in tokens.")
    ] = None,
    sources: Annotated[
        int,
        typer.Option(min=2, help="Most sources per prompt; each row draws 1 to this, < 2 shown is skipped."),
    ] = DEFAULT_PAIR_SOURCES,
    chunk_words: Annotated[
        int, typer.Option(min=5, help="Paragraphs are cut into chunks of whole sentences of about N words.")
    ] = DEFAULT_CHUNK_WORDS,
    limit: Annotated[int | None, typer.Option(min=1, help="Use a seeded sample of N questions.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of distractors, positions, rejected answers, sample.")] = 0,
) -> None:
    """Citation preference pairs from SQuAD: the gold span citing its source over a wrong citation/span."""
    from rag.preference_data import write_pairs

    tokenizer, max_tokens = _prompt_budget(model, max_new_tokens, tokenizer_path, max_tokens)
    stats = write_pairs(
        squad,
        tokenizer,
        out,
        chunk_words=chunk_words,
        max_tokens=max_tokens,
        sources=sources,
        limit=limit,
        seed=seed,
        progress=True,
    ).to_dict()
    console.print(
        f"{out}: {stats['pairs']:,} pairs from {stats['questions']:,} questions, prompts of at most "
        f"{max_tokens} tokens; rejected kinds {stats['kinds']}; sources {stats['sources']}; "
        f"gold position {stats['gold_positions']}; skipped {stats['skipped']}",
        highlight=False,
    )


@app.command("span-data")
@_friendly
def span_data(
    squad: Annotated[
        Path, typer.Option(help="SQuAD v1.1 JSON (.json or .json.gz), e.g. train-v1.1.json.gz.")
    ],
    out: Annotated[Path, typer.Option(help="JSONL file to write (rows for `rag train reader`).")],
    model: Annotated[
        Path | None,
        typer.Option(help="Reader checkpoint whose tokenizer to use (default: the bundled MiniLM's)."),
    ] = None,
    negatives: Annotated[
        float,
        typer.Option(min=0.0, help="No-answer rows per question (a same-article paragraph without it)."),
    ] = 0.6,
    limit: Annotated[int | None, typer.Option(min=1, help="Use a seeded sample of N questions.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of source numbers, negatives and the sample.")] = 0,
) -> None:
    """Rows for the warm-started reader: one (question, source) prompt each, the answer span + [n], or EOS."""
    from rag.llm.tokenizer import load_tokenizer
    from rag.llm.warmstart import minilm_dir
    from rag.span_data import write_span_rows

    tokenizer = load_tokenizer(model or minilm_dir())
    stats = write_span_rows(squad, tokenizer, out, limit=limit, progress=True, negatives=negatives, seed=seed)
    skipped = ", ".join(f"{k} {v}" for k, v in stats.skipped.items()) or "none"
    console.print(
        f"{out}: {stats.answer_rows:,} answer rows and {stats.no_answer_rows:,} no-answer rows from "
        f"{stats.questions:,} questions; skipped: {skipped}",
        highlight=False,
    )


@app.command("reader")
@_friendly
def reader(
    data: Annotated[Path, typer.Option(help="Span rows from `rag train span-data`.")],
    preset: Annotated[str, typer.Option(help="Training + model preset.")] = "minilm-reader",
    init: Annotated[
        str | None, typer.Option("--init", help="'minilm' (the warm start, default) or a checkpoint folder.")
    ] = None,
    out: Out = None,
    max_steps: MaxSteps = None,
    lr: Lr = None,
    resume: Resume = False,
    device: Device = "auto",
    parallel: Parallel = None,
    sets: Sets = None,
) -> None:
    """Fine-tune the warm-started reader (all-MiniLM-L6-v2 as a prefix-LM with a copy head) on span rows.

    Resumable: --resume continues the run in --out from its last checkpoint (saved every eval)."""
    from rag.llm.span_train import train_reader
    from rag.llm.train import shutdown_runtime

    given = dict(max_steps=max_steps, lr=lr, resume=resume, device=device, init_from=init, parallel=parallel)
    cfg = _config(preset, sets, out_dir=str(out or Path("runs") / "reader-cpu" / "sft"), **given)
    try:
        _report(train_reader(cfg, data), cfg.out_dir)
    finally:
        shutdown_runtime()


@app.command("export")
@_friendly
def export(
    run: Annotated[Path, typer.Option("--run", help="Checkpoint folder of a training run.")],
    out: Annotated[Path, typer.Option(help="Folder to write the shipped model to (e.g. models/reader).")],
    fp16: Annotated[
        bool, typer.Option(help="Store weights as float16 (half the size; loaded as float32).")
    ] = True,
) -> None:
    """Copy a run's weights, config and tokenizer (no optimizer state) into a model folder."""
    from rag.llm.checkpoint import export_checkpoint

    size = export_checkpoint(run, out, fp16=fp16)
    console.print(f"{out}: model.safetensors {size / 1e6:.1f} MB, config.json, tokenizer.json")


@app.command("reward")
@_friendly
def reward(
    data: AlignData,
    init: Init,
    out: Annotated[Path, typer.Option(help="Folder for the reward model, metrics and loss_curve.png.")],
    val_data: ValData = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Preference pairs per step.")] = 8,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    head_lr: Annotated[
        float | None, typer.Option(help="Learning rate of the new scalar head (default: --lr).")
    ] = None,
) -> None:
    """Reward model: --init's trunk + a scalar head, Bradley-Terry loss on chosen/rejected pairs."""
    from rag.llm.rlhf import RewardConfig, train_reward

    cfg = RewardConfig(steps, batch_size, lr, head_lr=head_lr)
    result = train_reward(data, init, out, cfg, val_data)
    print(json.dumps(result, indent=2))


@app.command("ppo")
@_friendly
def ppo(
    prompts: Annotated[Path, typer.Option(help='JSONL rows {"prompt"} (or {"prompt_ids"}).')],
    init: Init,
    out: Annotated[Path, typer.Option(help="Folder for the policy, metrics and ppo_curve.png.")],
    reward: Annotated[Path | None, typer.Option(help="A `rag train reward` folder.")] = None,
    citation_reward: Annotated[
        bool,
        typer.Option(
            help="Instead of --reward: score answers with the task's own check (citation precision + "
            "SQuAD F1); --prompts must be a `rag train pairs` file."
        ),
    ] = False,
    iterations: Annotated[int, typer.Option(help="Rollout + update rounds.")] = 50,
    batch_size: Annotated[int, typer.Option(help="Responses sampled per round.")] = 16,
    response_len: Annotated[int, typer.Option(help="Sampled tokens per response (EOS ends one).")] = 16,
    kl_coef: Annotated[float, typer.Option(help="Per-token KL penalty to --init.")] = 0.05,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-5,
) -> None:
    """PPO of --init (SFT policy, frozen KL reference) against a reward model or the citation check."""
    from rag.llm.rlhf import PPOConfig, train_ppo
    from rag.preference_data import train_ppo_on_citations

    if (reward is None) == (not citation_reward):
        raise ValueError("give one of --reward DIR (a reward model) or --citation-reward")
    cfg = PPOConfig(iterations, batch_size, response_len, lr=lr, kl_coef=kl_coef)
    if citation_reward:
        result = train_ppo_on_citations(prompts, init, out, cfg)
    else:
        result = train_ppo(prompts, init, reward, out, cfg)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m rag.llm.cli lm ...
    app()
