"""How long compress's local lm-eval tasks take in full on SmolLM2-135M, for the baseline and a result, and
what they score. The shipped recipes score the first 300 documents of compress_next_word (inside the test
suite's budget); this measures every document of both local tasks, each task timed on its own, so a recipe
author can see what a larger `lm_eval.limit` costs and how much the standard error shrinks.

The result is the recipe's stages run on the checkpoint (the stage registry, as in a run), then both sides are
scored by the same function a run uses (compressor.lm_harness.score: lm-eval's HF class for torch models),
with the quantized layers' float weights reused as a run's evaluation does.

Usage: python benchmarks/lm_tasks.py [--recipe recipes/smollm2-int4-gptq.yaml] [--model CKPT] [--limit N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASK = "text-generation"


def main() -> None:
    from compressor import fixtures, machine
    from compressor.artifacts import TorchModel
    from compressor.checkpoint import load_tokenizer
    from compressor.data import read
    from compressor.lm_harness import score
    from compressor.lm_tasks import LOCAL_TASKS, TaskRef, write_local_tasks
    from compressor.recipe import load_recipe
    from compressor.runners import make_runner
    from compressor.stages import REGISTRY, StageContext
    from compressor.task_scores import LOCAL_TASK_TEXT
    from compressor.weight_reuse import reused_weights

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "smollm2-int4-gptq.yaml")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the SmolLM2 fixture)")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    facts = machine.describe()
    print(f"machine: {facts['cpu_model']}, {facts['cpu_count']} CPUs, flags {' '.join(facts['isa_flags'])}")
    recipe = load_recipe(args.recipe)
    checkpoint = args.model or fixtures.ensure("smollm2")
    tokenizer = load_tokenizer(checkpoint)
    with tempfile.TemporaryDirectory(prefix="compress-lm-tasks-") as tmp:
        artifact = source = TorchModel(checkpoint, TASK)
        for index, config in enumerate(recipe.stages):
            ctx = StageContext(Path(tmp) / f"stage{index}", TASK, threads=2)
            ctx.workdir.mkdir(parents=True)
            print(f"stage {index + 1}/{len(recipe.stages)}: {config.type}", flush=True)
            artifact = REGISTRY[config.type].run(config, artifact, ctx)
        text = read(LOCAL_TASK_TEXT)
        task_dir = write_local_tasks(text.texts, text.source, Path(tmp) / "lm-eval")
        sides = [make_runner(source, "baseline", threads=2), make_runner(artifact, "result", threads=2)]
        rows = []
        for task in sorted(LOCAL_TASKS):
            for runner in sides:
                with reused_weights(getattr(runner, "module", None)):
                    scores = score(runner, tokenizer, [TaskRef(task)], task_dir, num_fewshot=None, limit=args.limit,
                                   batch_size=args.batch_size, apply_chat_template=False, max_length=2048)
                print(f"{task} on {runner.name}: {scores.documents[task]} documents, {scores.seconds:.0f} s",
                      flush=True)
                rows.append((task, runner.name, runner.backend, scores))
    print(f"\n{recipe.name} on {checkpoint.name}, 2 threads, batch {args.batch_size}, "
          f"{'all documents' if args.limit is None else f'first {args.limit} documents'}")
    print(f"{'task':26} {'side':9} {'backend':10} {'docs':>5} {'seconds':>8} {'docs/s':>7}  metrics (± standard error)")
    for task, side, backend, scores in rows:
        documents = scores.documents[task]
        figures = ", ".join(f"{name.split('/', 1)[1]} {value:.4f} ± {scores.stderr.get(name, float('nan')):.4f}"
                            for name, value in sorted(scores.metrics.items()) if name.startswith(task + "/"))
        print(f"{task:26} {side:9} {backend:10} {documents:5d} {scores.seconds:8.1f} "
              f"{documents / scores.seconds:7.1f}  {figures}")


if __name__ == "__main__":
    main()
