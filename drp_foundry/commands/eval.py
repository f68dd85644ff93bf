"""Command line for the continuation benchmark: ``drp-eval`` (or ``python -m drp_foundry.commands.eval``).

    drp-eval build --data HELDOUT_DIR --out items.jsonl --offline
    drp-eval build --data HELDOUT_DIR --out items.jsonl \\
        --llm-base-url https://api.openai.com/v1 --llm-model gpt-4o --llm-api-key-env OPENAI_API_KEY
    drp-eval score MODEL_DIR items.jsonl [--out results.json]
    drp-eval tasks --domains en ru zh --out my_tasks/

See docs/EVALUATION.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from drp_foundry.eval.continuation_items import (
    LLMJudgeVerifier,
    LLMWrongContinuationWriter,
    ModelVerifier,
    OtherDocumentWrongWriter,
    build_items,
    read_domain_documents,
)
from drp_foundry.eval.continuation_scorer import (
    NORMALIZATIONS,
    load_causal_lm,
    read_items,
    score_items,
    write_items,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='drp-eval', description='Per-domain continuation benchmark (DRPruning §5.2).')
    commands = parser.add_subparsers(dest='command', required=True)

    build = commands.add_parser('build', help='build items from held-out per-domain text')
    build.add_argument('--data', nargs='+', required=True,
                       help='<domain>.jsonl files or folders of them (one JSON object with "text" per line)')
    build.add_argument('--out', required=True, help='items JSONL to write')
    build.add_argument('--per-domain', type=int, default=400, help='items kept per domain (paper: 400)')
    build.add_argument('--seed', type=int, default=0)
    build.add_argument('--max-documents', type=int, default=None, help='read at most this many documents per domain')
    build.add_argument('--context-sentences', type=int, default=1, help='sentences in the context (ending with A)')
    build.add_argument('--continuation-words', type=int, default=None,
                       help='cut inside B: the continuation is its last N words (default: all of B)')
    build.add_argument('--pairing', choices=OtherDocumentWrongWriter.PAIRINGS, default='random',
                       help="offline: 'random' sentence of another document, or 'swap' continuations between two "
                            'items (context-only; a context-blind model scores exactly 50%%)')
    build.add_argument('--min-chars', type=int, default=20)
    build.add_argument('--max-chars', type=int, default=300)
    build.add_argument('--offline', action='store_true',
                       help='no LLM: wrong continuations swapped between documents (weaker variant)')
    build.add_argument('--llm-base-url', help='OpenAI-compatible endpoint, e.g. https://api.openai.com/v1')
    build.add_argument('--llm-model', help='model served by the endpoint')
    build.add_argument('--llm-api-key-env', default='OPENAI_API_KEY',
                       help='NAME of the environment variable holding the API key (never the key itself)')
    build.add_argument('--code-domains', nargs='*', default=['github'], help='domains treated as code')
    build.add_argument('--verifier-model', help='local HF model directory used as the margin verifier '
                                                '(default with an LLM: the LLM judge; offline: none)')
    build.add_argument('--candidates-per-item', type=float, default=2.0,
                       help='candidates written per kept item when a verifier ranks them')

    score = commands.add_parser('score', help='score a Hugging Face model directory on items')
    score.add_argument('model_dir')
    score.add_argument('items')
    score.add_argument('--batch-size', type=int, default=16)
    score.add_argument('--normalization', choices=NORMALIZATIONS, default='token_mean')
    score.add_argument('--device', default='cpu')
    score.add_argument('--max-length', type=int, default=None, help='context window (default: the model config)')
    score.add_argument('--out', help='also write the summary JSON here')

    tasks = commands.add_parser('tasks', help='write lm-eval task YAMLs for a set of domains')
    tasks.add_argument('--domains', nargs='+', required=True)
    tasks.add_argument('--out', required=True)
    return parser


def _build(args) -> dict:
    use_llm = bool(args.llm_base_url or args.llm_model)
    if use_llm == args.offline:
        raise SystemExit('build: choose exactly one of --offline or --llm-base-url/--llm-model '
                         '(offline items are the weaker variant; see docs/EVALUATION.md)')
    documents = read_domain_documents(args.data, max_documents=args.max_documents)
    verifier = None
    if args.verifier_model:
        model, tokenizer = load_causal_lm(args.verifier_model)
        verifier = ModelVerifier(model, tokenizer, name=Path(args.verifier_model).name)
    if use_llm:
        if not (args.llm_base_url and args.llm_model):
            raise SystemExit('build: an LLM build needs both --llm-base-url and --llm-model')
        from drp_foundry.eval.llm_client import OpenAICompatibleClient

        client = OpenAICompatibleClient(args.llm_base_url, args.llm_model, api_key_env=args.llm_api_key_env)
        writer = LLMWrongContinuationWriter(client, code_domains=args.code_domains)
        verifier = verifier or LLMJudgeVerifier(client, code_domains=args.code_domains)
    else:
        print('build: offline mode, the WEAKER variant: wrong continuations are real sentences swapped between '
              'documents, not LLM-edited ones', file=sys.stderr)
        writer = OtherDocumentWrongWriter(documents, pairing=args.pairing, min_chars=args.min_chars,
                                          max_chars=args.max_chars, continuation_words=args.continuation_words)
    items = build_items(documents, writer, per_domain=args.per_domain, verifier=verifier,
                        candidates_per_item=args.candidates_per_item, seed=args.seed,
                        min_chars=args.min_chars, max_chars=args.max_chars, context_sentences=args.context_sentences,
                        continuation_words=args.continuation_words)
    write_items(items, args.out)
    counts = {domain: sum(item.domain == domain for item in items) for domain in documents}
    return {'out': str(args.out), 'variant': writer.variant, 'items_per_domain': counts}


def _score(args) -> dict:
    if not (Path(args.model_dir) / 'config.json').is_file():
        raise FileNotFoundError(f'score: MODEL_DIR {args.model_dir} is not a Hugging Face model folder (no config.json); '
                         'pass the output of `drp-export` or a save_pretrained folder')
    if not Path(args.items).is_file():
        raise FileNotFoundError(f'score: items file {args.items} does not exist; write it with the `build` command')
    items = read_items(args.items)
    model, tokenizer = load_causal_lm(args.model_dir, device=args.device)
    report = score_items(model, tokenizer, items, batch_size=args.batch_size, normalization=args.normalization,
                         max_length=args.max_length)
    summary = {'model': str(args.model_dir), 'items': str(args.items), **report.summary()}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return summary


def _tasks(args) -> dict:
    from drp_foundry.eval.lm_eval_tasks import write_task_configs

    return {'written': [str(p) for p in write_task_configs(args.domains, args.out)]}


def run(argv: list[str] | None = None) -> dict:
    """Run one command and return its JSON-ready result (what ``main`` prints)."""
    args = _parser().parse_args(argv)
    return {'build': _build, 'score': _score, 'tasks': _tasks}[args.command](args)


def main(argv: list[str] | None = None) -> None:
    try:
        result = run(argv)
    except (FileNotFoundError, ValueError) as err:  # bad input: the message names the file or option
        raise SystemExit(f'drp-eval: error: {err}') from None
    print(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()
