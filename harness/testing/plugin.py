"""The pytest plugin of the testing kit (entry point `pytest11`: loaded wherever cl-harness is
installed). Its fixtures:

- `synthetic_dir`: the synthetic benchmark (120 training and 40 test examples per task), generated
  once per test session into pytest's temporary folder.
- `method_contract`: `method_contract("name")` runs the plugin contract (`harness check-method`)
  but the DeepSpeed check and fails the test with every failed check.
"""

import pytest


def pytest_configure(config):
    # peft still calls a transformers API deprecated for v6 (as the CLI, the kit keeps it quiet):
    # nothing a plugin's author can act on.
    config.addinivalue_line("filterwarnings", "ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    from harness.testing.kit import synthetic_benchmark

    return synthetic_benchmark(tmp_path_factory.mktemp("synthetic"), n_train=120, n_test=40)


@pytest.fixture
def method_contract(synthetic_dir, tmp_path):
    from harness.testing.contract import assert_method_passes

    def check(name: str, skip: tuple[str, ...] = ("two_ranks",)) -> None:
        assert_method_passes(name, skip, workdir=tmp_path / f"contract-{name}",
                             data_dir=synthetic_dir)

    return check
