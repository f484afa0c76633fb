//! The deployment files (issue #31): `Dockerfile`, `.dockerignore`,
//! `deploy/systemd/`, `deploy/kubernetes/` and `deploy/compose/`, checked as
//! far as this machine allows, offline:
//!
//! - the systemd unit passes `systemd-analyze verify` without a warning (a
//!   copy whose `ExecStart` names the binary cargo built, the one line that
//!   differs), and says what the drain needs;
//! - the Kubernetes manifests validate, strictly (no unknown field), against
//!   the schemas of the oldest and newest Kubernetes that the PyPI package
//!   `kubernetes-validate` bundles, and agree with each other (names, ports,
//!   labels, probes, the grace period);
//! - the compose file validates against the Compose Specification's schema
//!   (a copy in `tests/fixtures/`), and it and its Prometheus configuration
//!   name what they should;
//! - the example environment files name documented settings only, and
//!   `serve` starts with each of them;
//! - the Dockerfile, read by BuildKit's parser (the PyPI package
//!   `dockerfile`), has the instructions it needs (a static check: there is
//!   no Docker daemon here to build the image), and its HEALTHCHECK command,
//!   run with bash as Docker would, passes against a running gateway and
//!   fails against a stopped one and a 503.
//!
//! The tools: `systemd-analyze` (Debian's systemd), and a Python with
//! `kubernetes-validate` (which brings PyYAML and jsonschema) and
//! `dockerfile`: `$WSGATEWAY_TEST_PYTHON`, else the
//! virtualenv `target/test-python` that `scripts/test.sh` makes, else
//! `python3`; `scripts/test.sh` installs them. A missing tool fails the test
//! with what to install; nothing is skipped.

use crate::common::ServeProcess;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_wsgateway");

/// What `scripts/test.sh` installs.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
const DOCKERFILE: &str = "dockerfile==3.4.0";
/// The oldest and newest Kubernetes whose schemas it bundles.
const KUBERNETES_VERSIONS: &[&str] = &["1.25.0", "1.37.0"];

/// The drain window's default (`WSGATEWAY_DRAIN_S`): every stop timeout
/// must be above it.
const DRAIN_S: u64 = 30;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The Python that has `kubernetes_validate` and `yaml`, or a failure that
/// says how to get one.
fn python() -> String {
    // The script's virtualenv is found without the variable too, for
    // `cargo test` by hand after one run of the script.
    let venv = root().join("target/test-python/bin/python");
    let python = std::env::var("WSGATEWAY_TEST_PYTHON").unwrap_or_else(|_| {
        if venv.is_file() {
            venv.to_string_lossy().into_owned()
        } else {
            "python3".into()
        }
    });
    let probe = Command::new(&python)
        .args([
            "-c",
            "import kubernetes_validate, yaml, jsonschema, dockerfile",
        ])
        .output();
    match probe {
        Ok(out) if out.status.success() => python,
        _ => panic!(
            "no Python with kubernetes-validate and dockerfile ({python:?}): run \
             ./scripts/test.sh, which installs them, or `pip install '{KUBERNETES_VALIDATE}' \
             '{DOCKERFILE}'` and set WSGATEWAY_TEST_PYTHON to that Python"
        ),
    }
}

/// Every YAML document of `path` (relative to the repository), as JSON.
fn yaml_documents(path: &str) -> Vec<Value> {
    let out = Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml\n\
             print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1], encoding='utf-8')))))",
        ])
        .arg(root().join(path))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{path} does not parse as YAML:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn yaml(path: &str) -> Value {
    let mut docs = yaml_documents(path);
    assert_eq!(docs.len(), 1, "{path}: one document");
    docs.remove(0)
}

/// `45s`, `45`, `1min` as seconds (the forms these files use).
fn seconds(text: &str) -> u64 {
    let text = text.trim();
    if let Some(m) = text.strip_suffix("min") {
        return m.parse::<u64>().unwrap() * 60;
    }
    text.trim_end_matches('s')
        .parse()
        .unwrap_or_else(|_| panic!("not a duration: {text:?}"))
}

/// `KEY=value` lines of an environment file (comments and blanks skipped).
fn env_file(path: &str) -> Vec<(String, String)> {
    read(path)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{path}: not KEY=value: {l:?}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

// ---- systemd ----

fn unit_setting<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    const UNIT: &str = "deploy/systemd/wsgateway.service";
    const EXEC: &str = "ExecStart=/usr/local/bin/wsgateway serve";
    let unit = read(UNIT);
    assert!(unit.lines().any(|l| l == EXEC), "{UNIT}: no {EXEC:?}");
    // verify checks that ExecStart's binary exists: a copy names the one
    // cargo built, and differs in that line only.
    let dir = tempfile::tempdir().unwrap();
    let copy_path = dir.path().join("wsgateway.service");
    let copy = unit.replace(EXEC, &format!("ExecStart={BIN} serve"));
    let differing = unit.lines().zip(copy.lines()).filter(|(a, b)| a != b);
    assert_eq!(differing.count(), 1);
    std::fs::write(&copy_path, &copy).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy_path)
        .output()
        .unwrap_or_else(|e| {
            panic!("systemd-analyze cannot run ({e}): install systemd (apt-get install systemd)")
        });
    // An unknown key or a bad value is only a warning (exit 0): any output
    // fails.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {UNIT}: {:?}\n{said}",
        out.status
    );

    for (key, wanted) in [
        ("DynamicUser", "yes"),
        ("EnvironmentFile", "/etc/wsgateway/wsgateway.env"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
        ("LimitNOFILE", "1048576"),
        ("CapabilityBoundingSet", ""),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallFilter", "@system-service"),
    ] {
        assert!(
            unit_setting(&unit, key).contains(&wanted),
            "{UNIT}: no {key}={wanted}"
        );
    }
    assert!(
        unit_setting(&unit, "User").is_empty(),
        "{UNIT}: DynamicUser, no User="
    );
    let stop = unit_setting(&unit, "TimeoutStopSec");
    assert_eq!(stop.len(), 1, "{UNIT}: one TimeoutStopSec");
    assert!(
        seconds(stop[0]) > DRAIN_S,
        "{UNIT}: TimeoutStopSec must be above the {DRAIN_S} s drain window"
    );
}

// ---- example environment files ----

/// Every variable the example files set is a documented setting (a
/// misspelt one would be ignored), and `serve` starts with each file.
#[tokio::test]
async fn the_example_env_files_name_settings_and_serve_starts_with_them() {
    let documented = read("docs/CONFIGURATION.md");
    for path in [
        "deploy/systemd/wsgateway.env.example",
        "deploy/compose/gateway.env.example",
    ] {
        let vars = env_file(path);
        for (k, _) in &vars {
            assert!(
                k == "RUST_LOG" || documented.contains(&format!("`{k}`")),
                "{path}: {k} is not a setting of docs/CONFIGURATION.md"
            );
        }
        for secret in ["JWT_SECRET", "TABLE_TOKEN_SECRET", "WSGATEWAY_API_KEY"] {
            let value = &vars.iter().find(|(k, _)| k == secret).unwrap().1;
            assert!(
                value.contains("change-me"),
                "{path}: {secret} is a placeholder"
            );
        }
        // The file as it is, but on free loopback ports, and logging text
        // (the harness reads the address from the log line).
        let mut env: Vec<(&str, &str)> = vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .filter(|(k, _)| {
                ![
                    "WSGATEWAY_LISTEN",
                    "WSGATEWAY_METRICS_LISTEN",
                    "WSGATEWAY_LOG_FORMAT",
                ]
                .contains(k)
            })
            .collect();
        env.push(("WSGATEWAY_METRICS_LISTEN", "127.0.0.1:0"));
        env.push(("WSGATEWAY_LOG_FORMAT", "text"));
        let gateway = ServeProcess::start(&env).await;
        let health = reqwest::get(format!("http://{}/ws/health", gateway.addr))
            .await
            .unwrap();
        assert_eq!(health.status(), 200, "{path}");
        gateway.terminate();
        let (status, log) = gateway.wait().await;
        assert!(status.success(), "{path}: {status:?}\n{log}");
    }
}

// ---- Kubernetes ----

const MANIFESTS: &[&str] = &[
    "deploy/kubernetes/deployment.yaml",
    "deploy/kubernetes/service.yaml",
    "deploy/kubernetes/poddisruptionbudget.yaml",
    "deploy/kubernetes/secret.example.yaml",
];

#[test]
fn the_kubernetes_manifests_validate_against_the_schemas() {
    let python = python();
    let files: Vec<PathBuf> = MANIFESTS.iter().map(|m| root().join(m)).collect();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(&python)
            .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k"])
            .arg(version)
            .args(&files)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubernetes-validate --strict -k {version}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every manifest is in deploy/kubernetes/ and either here or the
    // kustomization (which is not a Kubernetes object).
    let listed: Vec<String> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .map(|n| format!("deploy/kubernetes/{n}"))
        .collect();
    for file in &listed {
        assert!(
            MANIFESTS.contains(&file.as_str()),
            "{file} is not validated"
        );
    }
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("nothing named {name} in {list}"))
}

#[test]
fn the_kubernetes_manifests_agree_with_each_other() {
    let deployment = yaml("deploy/kubernetes/deployment.yaml");
    let service = yaml("deploy/kubernetes/service.yaml");
    let pdb = yaml("deploy/kubernetes/poddisruptionbudget.yaml");
    let secret = yaml("deploy/kubernetes/secret.example.yaml");
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");

    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    for (k, v) in selector.as_object().unwrap() {
        assert_eq!(&labels[k], v, "the Deployment selects its pods");
        assert_eq!(
            &service["spec"]["selector"][k], v,
            "the Service selects them"
        );
    }
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector);
    assert_eq!(
        deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );

    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert!(c["resources"]["requests"].is_object() && c["resources"]["limits"].is_object());

    // Ports: the Service's name the container's, and the metrics listener
    // listens on the metrics port.
    assert_eq!(named(&c["ports"], "http")["containerPort"], 8001);
    assert_eq!(named(&c["ports"], "metrics")["containerPort"], 9101);
    for port in ["http", "metrics"] {
        assert_eq!(named(&service["spec"]["ports"], port)["targetPort"], port);
    }
    assert_eq!(
        named(&c["env"], "WSGATEWAY_METRICS_LISTEN")["value"],
        "0.0.0.0:9101"
    );
    assert_eq!(
        named(&c["env"], "WSGATEWAY_LISTEN")["value"],
        "0.0.0.0:8001"
    );

    // Readiness turns off during a drain; liveness does not.
    for (probe, path) in [
        ("readinessProbe", "/ws/health"),
        ("livenessProbe", "/ws/health/live"),
    ] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "http", "{probe}");
    }
    // preStop sleeps; the grace period (counted from preStop) covers the
    // sleep and the drain window.
    let pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .expect("a preStop exec hook");
    assert_eq!(pre_stop[0], "sleep");
    let sleep: u64 = pre_stop[1].as_str().unwrap().parse().unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > sleep + DRAIN_S,
        "terminationGracePeriodSeconds {grace} must exceed the preStop sleep and the drain window"
    );
    // Liveness never gives up on a pod within its grace period (a
    // draining node may be slow to answer).
    let liveness = &c["livenessProbe"];
    let patience = liveness["periodSeconds"].as_u64().unwrap()
        * liveness["failureThreshold"].as_u64().unwrap();
    assert!(
        patience > grace,
        "the liveness probe gives up after {patience} s"
    );

    // The pods read the Secret; the example holds placeholders only.
    assert_eq!(
        c["envFrom"][0]["secretRef"]["name"],
        secret["metadata"]["name"]
    );
    for (k, v) in secret["stringData"].as_object().unwrap() {
        let v = v.as_str().unwrap();
        assert!(
            v.contains("change-me") || k == "WSGATEWAY_REDIS_PREFIX",
            "secret.example.yaml: {k} is not a placeholder"
        );
    }
    for k in ["JWT_SECRET", "TABLE_TOKEN_SECRET", "REDIS_URL"] {
        assert!(secret["stringData"][k].is_string(), "the Secret has {k}");
    }

    // The kustomization applies every manifest but the example Secret.
    let resources: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(
        resources,
        [
            "deployment.yaml",
            "service.yaml",
            "poddisruptionbudget.yaml"
        ]
    );
    assert_eq!(kustomization["images"][0]["name"], c["image"]);
}

// ---- compose ----

/// Against the Compose Specification's schema (`tests/fixtures/compose-spec.json`,
/// a copy; `docker compose config` needs the compose plugin, which is not
/// here): a misspelt key or a wrong type fails.
#[test]
fn the_compose_file_validates_against_the_compose_schema() {
    let out = Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml, jsonschema\n\
             schema = json.load(open(sys.argv[1], encoding='utf-8'))\n\
             compose = yaml.safe_load(open(sys.argv[2], encoding='utf-8'))\n\
             errors = list(jsonschema.Draft7Validator(schema).iter_errors(compose))\n\
             for e in errors: print('/'.join(map(str, e.absolute_path)), e.message)\n\
             sys.exit(1 if errors else 0)",
        ])
        .arg(root().join("tests/fixtures/compose-spec.json"))
        .arg(root().join("deploy/compose/docker-compose.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy/compose/docker-compose.yml does not validate:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_compose_file_runs_two_nodes_on_redis_and_prometheus_scrapes_both() {
    const DIR: &str = "deploy/compose";
    let compose = yaml("deploy/compose/docker-compose.yml");
    let services = compose["services"].as_object().unwrap();
    let mut names: Vec<&str> = services.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["gateway-1", "gateway-2", "prometheus", "redis"]);
    assert!(
        services["redis"]["image"]
            .as_str()
            .unwrap()
            .starts_with("redis:7")
    );

    let gateways = ["gateway-1", "gateway-2"];
    let mut host_ports = Vec::new();
    for name in gateways {
        let g = &services[name];
        let build = &g["build"];
        let context = Path::new(DIR).join(build["context"].as_str().unwrap());
        assert!(
            root()
                .join(&context)
                .join(build["dockerfile"].as_str().unwrap())
                .is_file(),
            "{name} builds the repository's Dockerfile"
        );
        // Both nodes share the secrets' file, whose example is committed.
        assert_eq!(g["env_file"], "gateway.env", "{name}");
        assert!(root().join(DIR).join("gateway.env.example").is_file());
        assert_eq!(
            g["environment"]["REDIS_URL"], "redis://redis:6379",
            "{name}"
        );
        assert_eq!(g["environment"]["WSGATEWAY_METRICS_LISTEN"], "0.0.0.0:9101");
        assert_eq!(g["depends_on"]["redis"]["condition"], "service_healthy");
        let grace = seconds(g["stop_grace_period"].as_str().unwrap());
        assert!(
            grace > DRAIN_S,
            "{name}: stop_grace_period above the drain window"
        );
        let ports = g["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 1, "{name}: only the public port is published");
        let port = ports[0].as_str().unwrap();
        assert!(port.ends_with(":8001"), "{name}: {port}");
        host_ports.push(port.to_owned());
    }
    assert_ne!(host_ports[0], host_ports[1]);

    // Prometheus mounts its configuration and the repository's alert rules,
    // and scrapes both nodes' metrics listeners.
    let volumes: Vec<&str> = services["prometheus"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut mounted = Vec::new();
    for volume in volumes {
        let mut parts = volume.split(':');
        let (source, target) = (parts.next().unwrap(), parts.next().unwrap());
        assert!(
            root().join(DIR).join(source).is_file(),
            "prometheus mounts {source}, which does not exist"
        );
        mounted.push((source, target));
    }
    let prometheus = yaml("deploy/compose/prometheus.yml");
    assert!(mounted.contains(&("./prometheus.yml", "/etc/prometheus/prometheus.yml")));
    for rules in prometheus["rule_files"].as_array().unwrap() {
        assert!(
            mounted.iter().any(|(_, t)| rules == t),
            "the rule file {rules} is mounted"
        );
    }
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(job["metrics_path"], "/ws/metrics");
    let targets = &job["static_configs"][0]["targets"];
    assert_eq!(
        targets,
        &serde_json::json!(["gateway-1:9101", "gateway-2:9101"])
    );
}

// ---- Dockerfile ----

/// One instruction of the Dockerfile as BuildKit's own parser reads it (the
/// PyPI package `dockerfile` wraps it): continuation lines joined, flags
/// apart, `json` for the exec form.
#[derive(serde::Deserialize)]
struct Instruction {
    cmd: String,
    flags: Vec<String>,
    value: Vec<String>,
    json: bool,
}

/// The instructions Docker knows (the parser itself accepts any word).
const INSTRUCTIONS: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

fn dockerfile() -> Vec<Instruction> {
    let out = Command::new(python())
        .args([
            "-c",
            "import json, sys, dockerfile\n\
             print(json.dumps([dict(cmd=c.cmd.upper(), flags=list(c.flags), value=list(c.value), \
             json=c.json) for c in dockerfile.parse_file(sys.argv[1])]))",
        ])
        .arg(root().join("Dockerfile"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the Dockerfile does not parse (or the PyPI package `dockerfile` is missing: run \
         ./scripts/test.sh):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Static only: the image cannot be built here (no Docker daemon).
#[test]
fn the_dockerfile_has_what_a_deployment_needs() {
    let instructions = dockerfile();
    for i in &instructions {
        assert!(
            INSTRUCTIONS.contains(&i.cmd.as_str()),
            "unknown instruction {}",
            i.cmd
        );
    }
    let all = |name: &str| -> Vec<&Instruction> {
        instructions.iter().filter(|i| i.cmd == name).collect()
    };
    let froms = all("FROM");
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage");
    let build = &froms[0].value;
    assert!(
        build[0].starts_with("rust:") && build[1..] == ["AS", "build"],
        "{build:?}"
    );
    assert!(
        all("RUN")[0].value[0].contains("cargo build --release --locked -p wsgateway"),
        "the build stage builds the gateway, locked"
    );
    // After the last FROM: the runtime stage.
    let last_from = instructions.iter().rposition(|i| i.cmd == "FROM").unwrap();
    let runtime = &instructions[last_from..];
    assert!(
        runtime
            .iter()
            .any(|i| i.cmd == "RUN" && i.value[0].contains("ca-certificates"))
    );
    assert!(
        runtime
            .iter()
            .any(|i| i.cmd == "COPY" && i.flags == ["--from=build"])
    );
    let user = &runtime
        .iter()
        .rfind(|i| i.cmd == "USER")
        .expect("a USER in the runtime stage")
        .value[0];
    let uid = user.split(':').next().unwrap();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "USER {user}: a numeric non-root user (runAsNonRoot checks it)"
    );
    let exposed: Vec<&str> = all("EXPOSE")
        .iter()
        .flat_map(|i| i.value.iter().map(String::as_str))
        .collect();
    assert_eq!(exposed, ["8001", "9101"]);
    let env: Vec<&[String]> = all("ENV").iter().flat_map(|i| i.value.chunks(2)).collect();
    assert!(env.contains(
        &&[
            "WSGATEWAY_METRICS_LISTEN".to_owned(),
            "0.0.0.0:9101".to_owned()
        ][..]
    ));
    let one = |name: &str| -> &Instruction {
        let found = all(name);
        assert_eq!(found.len(), 1, "one {name}");
        found[0]
    };
    assert_eq!(one("STOPSIGNAL").value, ["SIGTERM"]);
    let entrypoint = one("ENTRYPOINT");
    assert!(entrypoint.json && entrypoint.value == ["wsgateway"]);
    let cmd = one("CMD");
    assert!(cmd.json && cmd.value == ["serve"]);
    let healthcheck = one("HEALTHCHECK");
    assert!(
        healthcheck.json && healthcheck.value[0] == "CMD",
        "HEALTHCHECK CMD [...]"
    );

    let ignored = read(".dockerignore");
    for entry in ["target/", ".git/", "**/node_modules/"] {
        assert!(
            ignored.lines().any(|l| l == entry),
            ".dockerignore lacks {entry}"
        );
    }
}

/// The HEALTHCHECK's command, as Docker runs it (exec form).
fn healthcheck_command() -> Vec<String> {
    let instructions = dockerfile();
    let healthcheck = instructions
        .iter()
        .find(|i| i.cmd == "HEALTHCHECK")
        .unwrap();
    assert!(healthcheck.json, "the exec form");
    healthcheck.value[1..].to_vec()
}

async fn run_healthcheck(listen: &str) -> bool {
    let command = healthcheck_command();
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(&command[0])
            .args(&command[1..])
            .env("WSGATEWAY_LISTEN", listen)
            .stderr(std::process::Stdio::null())
            .status(),
    )
    .await
    .expect("the healthcheck ends within its timeout")
    .unwrap();
    status.success()
}

/// The image's HEALTHCHECK (bash, /dev/tcp) against the real binary:
/// healthy while it serves, unhealthy once stopped, and on a 503.
#[tokio::test]
async fn the_dockerfile_healthcheck_tells_a_serving_gateway_from_a_stopped_one() {
    assert_eq!(healthcheck_command()[0], "bash");
    let gateway = ServeProcess::start(&[]).await;
    let listen = format!("0.0.0.0:{}", gateway.addr.rsplit(':').next().unwrap());
    assert!(run_healthcheck(&listen).await, "healthy while serving");
    gateway.terminate();
    let (status, _) = gateway.wait().await;
    assert!(status.success());
    assert!(!run_healthcheck(&listen).await, "unhealthy once stopped");

    // Something that answers, but not 200.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = [0; 1024];
        let _ = socket.read(&mut buf).await;
        socket
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
    });
    assert!(
        !run_healthcheck(&format!("0.0.0.0:{port}")).await,
        "unhealthy on 503"
    );
    server.await.unwrap();
}
