"""The environment of a Ray cluster the driver starts itself (`make demo`):
fast report polling, no preemption watcher (nothing on one machine is
preempted, and its actor prints a core_worker error line), the user's own
values winning. Checked without starting Ray: `connect` passes exactly this
dict as the local cluster's runtime environment."""

from service.ray_cluster import POLL_ENV, PREEMPTION_WATCHER_ENV, VERBOSE_ENV, local_cluster_env


def test_a_local_cluster_polls_fast_and_runs_no_preemption_watcher(monkeypatch):
    for name in (POLL_ENV, PREEMPTION_WATCHER_ENV, VERBOSE_ENV):
        monkeypatch.delenv(name, raising=False)
    env = local_cluster_env()
    assert env[PREEMPTION_WATCHER_ENV] == "0" and env[POLL_ENV] == "0.25" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    # The name Ray Train reads (private module: this fails loudly if an upgrade renames it).
    from ray.train.v2._internal.constants import ENABLE_PREEMPTION_WATCHER_ENV_VAR

    assert PREEMPTION_WATCHER_ENV == ENABLE_PREEMPTION_WATCHER_ENV_VAR


def test_the_users_values_win(monkeypatch):
    monkeypatch.setenv(PREEMPTION_WATCHER_ENV, "1")
    monkeypatch.setenv(POLL_ENV, "2")
    monkeypatch.setenv(VERBOSE_ENV, "1")
    env = local_cluster_env()
    assert (env[PREEMPTION_WATCHER_ENV], env[POLL_ENV], env[VERBOSE_ENV]) == ("1", "2", "1")
