"""Property-based fuzzing from the served OpenAPI spec: no input may cause a 5xx.

(schemathesis' own pytest plugin does not work with this pytest, so each operation's
strategy is driven by hypothesis directly; the check is schemathesis' not_a_server_error.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from apihelpers import auth
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from gpucloud.api.testserver import ApiProcess, agent_token

MAX_EXAMPLES = 30  # per operation


@pytest.fixture(scope="module")
def fuzz_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    with ApiProcess(tmp_path_factory.mktemp("fuzz")) as api:
        yield api


def _fuzz(operation: schemathesis.APIOperation, base_url: str) -> None:
    # Usage is posted as an agent, the rest as an admin: the deepest code paths.
    token = agent_token("node-a") if operation.path == "/v1/usage" else "admin-token"

    # Valid and invalid inputs mixed: MAX_EXAMPLES cases per operation in all.
    modes = st.sampled_from([GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    cases = modes.flatmap(lambda mode: operation.as_strategy(generation_mode=mode))

    @given(case=cases)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(
            base_url=base_url, headers=auth(token), checks=[not_a_server_error], timeout=30
        )

    run()


@pytest.mark.slow
def test_no_server_errors(fuzz_api: ApiProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_api.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    failures: dict[str, str] = {}
    for operation in operations:
        try:
            _fuzz(operation, fuzz_api.url)
        except Exception as exc:  # collect every operation's failure, then report all
            failures[operation.label] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
