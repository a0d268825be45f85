"""The build plan and the wrapper modules, without running Go."""

import json
import re
import stat
from pathlib import Path

import pytest

from lmforge.devcluster.cluster import build
from lmforge.devcluster.cluster.build import (
    GOMOD_DIR,
    BuildError,
    Versions,
    build_plan,
    go_build_command,
    go_env,
    kube_version_ldflags,
    missing_steps,
    parse_go_version,
)

EXPECTED_BINARIES = {
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
}


def test_plan_builds_each_binary_once_from_an_existing_wrapper():
    plan = build_plan()
    assert [s.binary for s in plan].count("kube-apiserver") == 1
    assert {s.binary for s in plan} == EXPECTED_BINARIES
    for step in plan:
        assert (GOMOD_DIR / step.gomod / "go.mod").is_file()
        assert (GOMOD_DIR / step.gomod / "go.sum").is_file()


def test_parallel_pairs_never_build_two_kubernetes_binaries_at_once():
    plan = build_plan()
    for first, second in zip(plan[0::2], plan[1::2], strict=False):
        assert not (first.gomod == second.gomod == "kubernetes")


def test_kube_ldflags_set_both_version_packages():
    flags = kube_version_ldflags("v1.36.3", "2026-07-22T18:07:38Z")
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        assert f"-X {package}.gitVersion=v1.36.3" in flags
        assert f"-X {package}.gitMajor=1" in flags
        assert f"-X {package}.gitMinor=36" in flags
        assert f"-X {package}.gitTreeState=clean" in flags
        assert f"-X {package}.buildDate=2026-07-22T18:07:38Z" in flags


def test_every_binary_gets_its_real_version_stamped():
    by_name = {s.binary: s for s in build_plan()}
    assert "-X k8s.io/component-base/version.gitVersion=v1.36.3" in by_name["kubectl"].ldflags
    assert "-X helm.sh/helm/v3/internal/version.version=v3.21.4" in by_name["helm"].ldflags
    assert "-X go.etcd.io/etcd/api/v3/version.GitSHA=v3.6.16" in by_name["etcd"].ldflags
    assert "-X sigs.k8s.io/kwok/pkg/consts.Version=0.8.0" in by_name["kwok"].ldflags


def test_go_build_command():
    step = build_plan()[0]
    command = go_build_command("/go/bin/go", step, Path("/out/.kube-apiserver.partial"))
    assert command[:4] == ["/go/bin/go", "build", "-o", "/out/.kube-apiserver.partial"]
    assert command[4] == "-ldflags" and command[5].startswith("-s -w -X ")
    assert command[-1] == "k8s.io/kubernetes/cmd/kube-apiserver"


def test_go_env_keeps_everything_in_the_cache_and_needs_no_c_compiler(tmp_path):
    env = go_env(tmp_path, base={"PATH": "/usr/bin", "GOFLAGS": "-mod=vendor"})
    for key in ("GOMODCACHE", "GOCACHE", "GOPATH"):
        assert Path(env[key]).is_relative_to(tmp_path)
    assert env["CGO_ENABLED"] == "0"
    assert env["GOFLAGS"] == "-modcacherw -trimpath -buildvcs=false -mod=readonly"
    assert env["PATH"] == "/usr/bin"


def _require(gomod: str, module: str) -> str:
    text = (GOMOD_DIR / gomod / "go.mod").read_text()
    return re.search(rf"^\s*(?:require\s+)?{re.escape(module)} (v\S+)", text, re.M).group(1)


def test_wrapper_pins_match_versions():
    versions = Versions()
    assert _require("kubernetes", "k8s.io/kubernetes") == versions.kubernetes
    assert _require("etcd", "go.etcd.io/etcd/server/v3") == versions.etcd
    assert _require("kwok", "sigs.k8s.io/kwok") == versions.kwok
    assert _require("helm", "helm.sh/helm/v3") == versions.helm
    assert _require("helm", "k8s.io/client-go") == f"v0.{versions.helm_kube_minor}.2"


def test_kubernetes_wrapper_replaces_every_staging_module_with_the_matching_tag():
    text = (GOMOD_DIR / "kubernetes" / "go.mod").read_text()
    replaces = re.findall(r"^\s*(k8s\.io/\S+) => (k8s\.io/\S+) (v\S+)$", text, re.M)
    assert len(replaces) >= 30
    staging_tag = "v0." + Versions().kubernetes.removeprefix("v1.")
    for source, target, version in replaces:
        assert source == target and version == staging_tag
    assert {"k8s.io/api", "k8s.io/client-go", "k8s.io/apiserver", "k8s.io/cri-streaming"} <= {
        r[0] for r in replaces
    }


def test_missing_steps_uses_the_manifest_fingerprints(tmp_path):
    plan = build_plan()
    assert missing_steps(plan, tmp_path) == plan
    for step in plan:
        (tmp_path / step.binary).write_text("")
    (tmp_path / "manifest.json").write_text(json.dumps({s.binary: s.fingerprint for s in plan[1:]}))
    assert missing_steps(plan, tmp_path) == plan[:1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("go1.26.8", (1, 26)),
        ("go version go1.22.2 linux/amd64", (1, 22)),
        ("", None),
    ],
)
def test_parse_go_version(text, expected):
    assert parse_go_version(text) == expected


def _fake_go(tmp_path: Path, goversion: str, build_output: str = "", build_rc: int = 0) -> Path:
    script = tmp_path / "go"
    script.write_text(f"""#!/bin/sh
if [ "$1" = env ]; then echo {goversion}; exit 0; fi
echo '{build_output}' >&2
exit {build_rc}
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_old_go_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_GO", str(_fake_go(tmp_path, "go1.22.2")))
    with pytest.raises(BuildError, match=r"(?s)find Go.*go1.22.2.*Go >= 1.26.*go.dev/dl"):
        build.find_go()


def test_missing_go_says_what_to_install(monkeypatch):
    monkeypatch.delenv("LMFORGE_GO", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(build, "DEFAULT_GO", "/nonexistent/go")
    with pytest.raises(BuildError, match=r"(?s)no `go` binary found.*go.dev/dl"):
        build.find_go()


def test_failed_build_names_the_step_and_shows_go_output(tmp_path, monkeypatch):
    go = _fake_go(tmp_path, "go1.26.8", "dial tcp: lookup proxy.golang.org: no such host", build_rc=1)
    monkeypatch.setenv("LMFORGE_GO", str(go))
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    messages = []
    step = build_plan()[1]  # etcd
    with pytest.raises(BuildError) as error:
        build.build([step], tmp_path / "bin", log=messages.append)
    assert "step 'build etcd' failed" in str(error.value)
    assert "no such host" in str(error.value)
    assert messages[1] == "building etcd v3.6.16 (1/1)…"
    assert not (tmp_path / "bin" / "etcd").exists()


def test_network_failures_get_a_hint_other_failures_do_not():
    assert "could not download modules" in build.network_hint(
        "dial tcp: lookup proxy.golang.org on 10.0.0.1:53: no such host", "https://proxy.golang.org,direct"
    )
    assert build.network_hint("undefined: foo", "https://proxy.golang.org") == ""
