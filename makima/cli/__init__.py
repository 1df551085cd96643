"""The pieces of the `makima` command line (starter.py is the entry point):

- `spec`: load a directive spec from YAML or JSON, apply command-line
  overrides, and list every problem before anything starts;
- `render`: the step table, the status view and the DAG as text, mermaid, dot;
- `commands`: one coroutine per command, each returning the exit code;
- `demo`: the `demo` command's scenario.
"""

#: Exit codes of every command.
EXIT_OK = 0
EXIT_REFUSED = 1  # the directive failed, or the action was refused
EXIT_BAD_INPUT = 2
