"""`python -m bench.caching`: what prompt caching saves the `anthropic` agent.

A scripted 20-turn agent step (19 turns each read a different ~6 KB source file
of the worktree, the 20th answers) runs twice through the real
`AnthropicExecutor` and the real `anthropic` client against the test suite's
Messages API server (tests/messages_server.py), which bills every request by
Anthropic's caching rules (tests.messages_server.PromptCache: a prefix up to a
breakpoint, or up to 20 blocks before one, written within 5 minutes is a cache
read, the rest up to the breakpoint a write; four characters a token). Prices
come from makima's own table (makima/llm/pricing.py). Prints the billed tokens
and cost with caching and without, and their ratio (target <= 0.35).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from anthropic import AsyncAnthropic

from makima.executors.anthropic_agent import DEFAULT_EXECUTOR_MODEL, AnthropicExecutor
from makima.executors.base import ExecutionRequest
from makima.models import DirectiveSpec, ExecutorKind, PlannedStep, Repository, Usage
from tests.messages_server import MessagesServer, text_reply, tool_reply, usage

TARGET_RATIO = 0.35


def _source_file(index: int, size: int) -> str:
    line = f"def function_{index}_{{n}}(value):  # helper {index}\n    return value * {index} + {{n}}\n"
    text, n = "", 0
    while len(text) < size:
        text += line.format(n=n)
        n += 1
    return text


async def run_step(turns: int, file_bytes: int, *, caching: bool) -> Usage:
    with tempfile.TemporaryDirectory(prefix="makima-bench-cache-") as folder, \
            MessagesServer(caching=True) as server:
        worktree = Path(folder)
        for index in range(1, turns):
            (worktree / f"module_{index}.py").write_text(_source_file(index, file_bytes))
        server.script(*[tool_reply("read_file", {"path": f"module_{index}.py"},
                                   text=f"Reading module {index}.", used=usage(0, 60))
                        for index in range(1, turns)],
                      text_reply("Read every module; nothing to change.", used=usage(0, 40)))
        client = AsyncAnthropic(api_key="bench", base_url=server.base_url, max_retries=0)
        executor = AnthropicExecutor(client, prompt_caching=caching)
        spec = DirectiveSpec(title="Cache bench", goal="Review every module of the package",
                             repository=Repository(path=folder), executor=ExecutorKind.ANTHROPIC)
        result = await executor.run(ExecutionRequest(
            directive_id="directive-bench-cache", spec=spec, attempt=1, worktree=worktree,
            step=PlannedStep(name="review", task_plan="Read each module_N.py in turn.")))
        await client.close()
        assert len(server.requests) == turns, f"{len(server.requests)} requests, not {turns}"
        return result.usage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--file-bytes", type=int, default=6000)
    args = parser.parse_args(argv)
    cached = asyncio.run(run_step(args.turns, args.file_bytes, caching=True))
    plain = asyncio.run(run_step(args.turns, args.file_bytes, caching=False))
    print(f"{args.turns}-turn anthropic agent step, model {DEFAULT_EXECUTOR_MODEL}, "
          f"files of {args.file_bytes} bytes")
    print(f"{'':16}{'input':>10}{'cache read':>12}{'cache write':>13}{'output':>9}{'cost USD':>11}")
    for name, used in (("with caching", cached), ("without caching", plain)):
        print(f"{name:16}{used.input_tokens:>10}{used.cache_read_tokens:>12}"
              f"{used.cache_write_tokens:>13}{used.output_tokens:>9}{used.cost_usd:>11.4f}")
    ratio = cached.cost_usd / plain.cost_usd if plain.cost_usd else float("nan")
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    print(f"billed cost with caching / without: {ratio:.3f} ({verdict} the target "
          f"<= {TARGET_RATIO})")


if __name__ == "__main__":
    main()
