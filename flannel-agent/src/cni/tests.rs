//! The whole plugin driven as a runtime drives it (environment, stdin, stdout, exit code),
//! with a scripted delegate plugin that records what it was given.

use std::{ffi::OsString, os::unix::fs::PermissionsExt, path::PathBuf};

use serde_json::{json, Value};

use super::{run, Invocation};

const SUBNET_ENV: &str =
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
const RESULT: &str = r#"{"cniVersion":"0.3.1","interfaces":[{"name":"eth0"}],"ips":[{"version":"4","address":"10.244.1.2/24","gateway":"10.244.1.1","interface":0}]}"#;
/// The delegate kube-flannel's conflist gets on a node with 10.244.1.0/24, as Go marshals it.
const EXPECTED_DELEGATE: &str = r#"{"cniVersion":"0.3.1","hairpinMode":true,"ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}],"type":"host-local"},"isDefaultGateway":true,"isGateway":true,"mtu":1450,"name":"cbr0","type":"bridge"}"#;

/// A temp dir holding subnet.env, dataDir, a CNI_PATH with a scripted `bridge`, and its logs.
struct Lab {
    dir: tempfile::TempDir,
}

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn error(&self) -> Value {
        assert_eq!(self.code, 1, "expected a failure, stdout {} stderr {}", self.stdout, self.stderr);
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {}", self.stdout))
    }
}

impl Lab {
    /// `bridge` exits with `exit` after printing `output` (the result, or an error JSON).
    fn new(output: &str, exit: i32) -> Lab {
        let lab = Lab { dir: tempfile::tempdir().unwrap() };
        std::fs::create_dir(lab.path("bin")).unwrap();
        std::fs::create_dir(lab.path("log")).unwrap();
        std::fs::write(lab.path("subnet.env"), SUBNET_ENV).unwrap();
        lab.set_plugin(output, exit);
        lab
    }

    fn set_plugin(&self, output: &str, exit: i32) {
        let plugin = self.path("bin/bridge");
        let script = format!(
            "#!/bin/sh\nlog={log}\ncat > \"$log/$CNI_COMMAND.stdin\"\nenv > \"$log/$CNI_COMMAND.env\"\necho \"$CNI_COMMAND\" >> \"$log/calls\"\nprintf '%s' '{output}'\nexit {exit}\n",
            log = self.path("log").display()
        );
        std::fs::write(&plugin, script).unwrap();
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn config(&self, cni_version: &str) -> String {
        format!(
            r#"{{"cniVersion":"{cni_version}","name":"cbr0","type":"flannel","subnetFile":"{}","dataDir":"{}",
                "delegate":{{"hairpinMode":true,"isDefaultGateway":true}}}}"#,
            self.path("subnet.env").display(),
            self.path("data").display()
        )
    }

    fn saved(&self, id: &str) -> Option<String> {
        std::fs::read_to_string(self.path("data").join(id)).ok()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path("log").join(name)).unwrap_or_default()
    }

    fn run(&self, command: &str, id: &str, config: &str) -> Outcome {
        self.run_env(config, &[("CNI_COMMAND", command), ("CNI_CONTAINERID", id)])
    }

    fn run_env(&self, config: &str, vars: &[(&str, &str)]) -> Outcome {
        let mut env: Vec<(OsString, OsString)> = vec![
            ("PATH".into(), std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into())),
            ("CNI_NETNS".into(), "/var/run/netns/pod".into()),
            ("CNI_IFNAME".into(), "eth0".into()),
            ("CNI_PATH".into(), format!("/nonexistent:{}", self.path("bin").display()).into()),
        ];
        for (k, v) in vars {
            env.retain(|(name, _)| name != k);
            env.push(((*k).into(), (*v).into()));
        }
        invoke(env, config.as_bytes())
    }
}

fn invoke(env: Vec<(OsString, OsString)>, stdin: &[u8]) -> Outcome {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let code = run(Invocation { env, stdin: &mut &stdin[..], stdout: &mut stdout, stderr: &mut stderr });
    Outcome { code, stdout: String::from_utf8(stdout).unwrap(), stderr: String::from_utf8(stderr).unwrap() }
}

fn env_var(env_dump: &str, name: &str) -> Option<String> {
    env_dump.lines().find_map(|l| l.strip_prefix(&format!("{name}=")).map(str::to_string))
}

#[test]
fn version_prints_supported_versions_without_reading_stdin() {
    struct NoRead;
    impl std::io::Read for NoRead {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            panic!("VERSION must not read stdin")
        }
    }
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let code = run(Invocation {
        env: vec![("CNI_COMMAND".into(), "VERSION".into())],
        stdin: &mut NoRead,
        stdout: &mut stdout,
        stderr: &mut stderr,
    });
    assert_eq!(code, 0);
    let v: Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(
        v,
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
}

#[test]
fn without_a_command_it_prints_what_it_is() {
    let out = invoke(vec![], b"");
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout, "");
    assert!(out.stderr.starts_with("CNI Plugin flannel version v"), "{}", out.stderr);
    assert!(out.stderr.ends_with("CNI protocol versions supported: 0.1.0, 0.2.0, 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0\n"));
}

#[test]
fn protocol_errors_are_cni_error_json() {
    let out = invoke(vec![("CNI_COMMAND".into(), "ADD".into())], b"");
    assert_eq!(
        out.error(),
        json!({"cniVersion": "1.1.0", "code": 4, "msg": "required env variables [CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME,CNI_PATH] missing"})
    );
    assert!(out.stdout.starts_with("{\n    \"cniVersion\": \"1.1.0\",\n    \"code\": 4,"), "{}", out.stdout);

    let lab = Lab::new(RESULT, 0);
    assert_eq!(
        lab.run("ADD", "c1", r#"{"cniVersion":"0.4.0","type":"flannel"}"#).error(),
        json!({"cniVersion": "0.4.0", "code": 7, "msg": "missing network name"})
    );
    assert_eq!(
        lab.run("ADD", "c1", "{").error(),
        json!({"cniVersion": "1.1.0", "code": 6, "msg": "error unmarshall network config: unexpected end of JSON input"})
    );
    let e = lab.run("ADD", "c1", r#"{"cniVersion":"0.5.0","name":"cbr0"}"#).error();
    assert_eq!((e["code"].as_u64(), e["msg"].as_str()), (Some(1), Some("incompatible CNI versions")));
    assert_eq!(
        lab.run("FOO", "c1", &lab.config("0.3.1")).error(),
        json!({"cniVersion": "0.3.1", "code": 4, "msg": "unknown CNI_COMMAND: FOO"})
    );
    assert_eq!(lab.run("GC", "c1", &lab.config("1.1.0")).code, 0);
    assert_eq!(lab.run("STATUS", "c1", &lab.config("0.3.1")).error()["msg"], "config version does not allow STATUS");
    assert_eq!(lab.log("calls"), "");
}

#[test]
fn add_saves_the_delegate_config_and_prints_the_result() {
    let lab = Lab::new(RESULT, 0);
    let out = lab.run("ADD", "c1", &lab.config("0.3.1"));
    assert_eq!(out.code, 0, "{} {}", out.stdout, out.stderr);
    assert_eq!(out.stdout, RESULT);
    assert_eq!(lab.saved("c1").as_deref(), Some(EXPECTED_DELEGATE));
    let mode = std::fs::metadata(lab.path("data/c1")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(lab.log("ADD.stdin"), EXPECTED_DELEGATE);
    let env = lab.log("ADD.env");
    assert_eq!(env_var(&env, "CNI_COMMAND").as_deref(), Some("ADD"));
    assert_eq!(env_var(&env, "CNI_CONTAINERID").as_deref(), Some("c1"));
    assert_eq!(env_var(&env, "CNI_NETNS").as_deref(), Some("/var/run/netns/pod"));
    assert_eq!(env_var(&env, "CNI_IFNAME").as_deref(), Some("eth0"));
    assert_eq!(env_var(&env, "CNI_PATH"), Some(format!("/nonexistent:{}", lab.path("bin").display())));
    assert!(out.stderr.contains(EXPECTED_DELEGATE), "{}", out.stderr);
}

#[test]
fn add_fills_in_a_missing_result_version() {
    let lab = Lab::new(r#"{"ips":[]}"#, 0);
    let out = lab.run("ADD", "c1", &lab.config("0.4.0"));
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout, r#"{"cniVersion":"0.4.0","ips":[]}"#);
}

#[test]
fn add_failures() {
    // The delegate's own error is passed on as it is; the saved file stays for DEL.
    let lab = Lab::new(r#"{"cniVersion":"0.3.1","code":11,"msg":"try again","details":"busy"}"#, 1);
    let out = lab.run("ADD", "c1", &lab.config("0.3.1"));
    assert_eq!(out.error(), json!({"cniVersion": "0.3.1", "code": 11, "msg": "try again", "details": "busy"}));
    assert_eq!(lab.saved("c1").as_deref(), Some(EXPECTED_DELEGATE));

    // A delegate that cannot be found.
    let config = lab.config("0.3.1").replace(r#""hairpinMode":true"#, r#""type":"macvlan""#);
    let e = lab.run("ADD", "c2", &config).error();
    assert_eq!(e["code"], 999);
    assert_eq!(
        e["msg"],
        format!(
            "failed to delegate add: failed to find plugin \"macvlan\" in path [/nonexistent {}]",
            lab.path("bin").display()
        )
    );

    // No subnet.env: nothing is saved or run.
    std::fs::remove_file(lab.path("subnet.env")).unwrap();
    let e = lab.run("ADD", "c3", &lab.config("0.3.1")).error();
    let file = lab.path("subnet.env");
    assert_eq!(
        e,
        json!({"cniVersion": "0.3.1", "code": 999, "msg": format!("failed to load flannel 'subnet.env' file: open {}: no such file or directory. Check the flannel pod log for this node.", file.display())})
    );
    assert_eq!(lab.saved("c3"), None);

    // A subnet.env without the MTU.
    std::fs::write(&file, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPMASQ=true\n")
        .unwrap();
    let e = lab.run("ADD", "c3", &lab.config("0.3.1")).error();
    assert_eq!(
        e["msg"],
        format!(
            "failed to load flannel 'subnet.env' file: {} is missing FLANNEL_MTU. Check the flannel pod log for this node.",
            file.display()
        )
    );

    // A delegate section flannel refuses.
    std::fs::write(&file, SUBNET_ENV).unwrap();
    let config = lab.config("0.3.1").replace(r#""hairpinMode":true"#, r#""name":"x""#);
    assert_eq!(
        lab.run("ADD", "c3", &config).error()["msg"],
        "'delegate' dictionary must not have 'name' field, it'll be set by flannel"
    );
    assert_eq!(lab.saved("c3"), None);
    assert_eq!(lab.log("calls"), "ADD\n");
}

#[test]
fn add_refuses_the_plugins_own_netns() {
    let lab = Lab::new(RESULT, 0);
    let out = lab.run_env(
        &lab.config("0.3.1"),
        &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_NETNS", "/proc/self/ns/net")],
    );
    assert_eq!(
        out.error(),
        json!({"cniVersion": "0.3.1", "code": 8, "msg": "plugin's netns and netns from CNI_NETNS should not be the same"})
    );
    assert_eq!(lab.saved("c1"), None);
    assert_eq!(lab.log("calls"), "");
}

#[test]
fn del_uses_the_saved_config_then_removes_it() {
    let lab = Lab::new(RESULT, 0);
    assert_eq!(lab.run("ADD", "c1", &lab.config("0.3.1")).code, 0);
    lab.set_plugin("", 0);
    // DEL needs no netns, and the config given to DEL does not matter beyond dataDir.
    let config = lab.config("0.3.1").replace(r#""hairpinMode":true"#, r#""mtu":1"#);
    let out = lab.run_env(&config, &[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c1"), ("CNI_NETNS", "")]);
    assert_eq!((out.code, out.stdout.as_str()), (0, ""));
    assert_eq!(lab.log("DEL.stdin"), EXPECTED_DELEGATE);
    assert_eq!(env_var(&lab.log("DEL.env"), "CNI_COMMAND").as_deref(), Some("DEL"));
    assert_eq!(lab.saved("c1"), None);
    // Again: nothing saved, nothing to do.
    assert_eq!(lab.run("DEL", "c1", &config).code, 0);
    assert_eq!(lab.log("calls"), "ADD\nDEL\n");
}

#[test]
fn del_failures() {
    let lab = Lab::new(RESULT, 0);
    assert_eq!(lab.run("ADD", "c1", &lab.config("0.3.1")).code, 0);
    lab.set_plugin(r#"{"code":5,"msg":"io"}"#, 1);
    assert_eq!(
        lab.run("DEL", "c1", &lab.config("0.3.1")).error(),
        json!({"cniVersion": "0.3.1", "code": 5, "msg": "io"})
    );
    assert_eq!(lab.saved("c1").as_deref(), Some(EXPECTED_DELEGATE), "kept for the retry");

    // A saved file that does not decode: flannel gives up quietly and leaves it.
    std::fs::write(lab.path("data/c2"), "not json").unwrap();
    let out = lab.run("DEL", "c2", &lab.config("0.3.1"));
    assert_eq!(out.code, 0);
    assert!(out.stderr.starts_with("failed to parse netconf: "), "{}", out.stderr);
    assert_eq!(lab.saved("c2").as_deref(), Some("not json"));
    assert_eq!(lab.log("calls"), "ADD\nDEL\n");

    // The plugin config itself must still decode.
    let e = lab.run("DEL", "c1", r#"{"name":"cbr0","dataDir":1}"#).error();
    assert_eq!(
        e["msg"],
        "failed to load netconf: json: cannot unmarshal number into Go struct field NetConf.dataDir of type string"
    );
}

#[test]
fn check_only_checks_versions_as_in_flannel() {
    let lab = Lab::new(RESULT, 0);
    // CHECK came with spec 0.4.0.
    assert_eq!(
        lab.run("CHECK", "c1", &lab.config("0.3.1")).error(),
        json!({"cniVersion": "0.3.1", "code": 1, "msg": "config version does not allow CHECK"})
    );
    assert_eq!(
        lab.run("CHECK", "c1", &lab.config("2.0.0")).error(),
        json!({"cniVersion": "2.0.0", "code": 1, "msg": "plugin version does not allow CHECK"})
    );
    // Otherwise it succeeds without running the delegate, as flannel's cmdCheck does.
    let result = RESULT.replace("0.3.1", "1.0.0");
    let config = lab.config("1.0.0").replacen('{', &format!(r#"{{"prevResult":{result},"#), 1);
    let out = lab.run("CHECK", "c1", &config);
    assert_eq!((out.code, out.stdout.as_str()), (0, ""));
    assert_eq!(lab.log("calls"), "");
}
