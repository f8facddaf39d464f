"""The testing kit for method plugins: a public, documented API, versioned with cl-harness (a
change that breaks it is a breaking change of the project). See docs/writing-a-method.md.

- `make_context`, `train_stage`, `at_stage`, `at_second_stage`: a method's hooks on the tiny
  embedded T5 and synthetic tasks, a stage trained as the harness trains one;
- `run_method`: a whole run in this process, as `harness run` makes it;
- `check_method`, `assert_method_passes`, `CHECKS`: the plugin contract (`harness check-method`);
- the pytest fixtures `synthetic_dir` and `method_contract` (harness.testing.plugin).
"""

from harness.testing.contract import (CHECKS, CheckResult, ContractError, assert_method_passes,
                                      check_method)
from harness.testing.kit import (TINY, at_second_stage, at_stage, make_context, run_method,
                                 synthetic_benchmark, train_stage)

__all__ = ["CHECKS", "CheckResult", "ContractError", "TINY", "assert_method_passes", "at_second_stage",
           "at_stage", "check_method", "make_context", "run_method", "synthetic_benchmark",
           "train_stage"]
