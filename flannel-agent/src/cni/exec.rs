//! Finding the delegate plugin in CNI_PATH and running it, as the Go library's `invoke`
//! package does: the config on stdin, this process's environment with CNI_COMMAND set to the
//! delegated command, stdout captured (the result, or the error JSON on failure), stderr
//! passed on after a success.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    io::{Read, Write},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::Duration,
};

use super::{
    spec::{CniError, Failure},
    subnet_file::go_errno,
};
use crate::gojson::{self, go_quote, Json, Value};

/// Result versions the Go library can decode (`create.Create`).
const RESULT_VERSIONS: &[&str] = &["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// How often a plugin binary that is being written ("text file busy") is retried, a second apart.
const BUSY_RETRIES: u32 = 5;

/// `invoke.FindInPath`: the first regular file (symlinks followed) named `plugin` in the
/// colon-separated `cni_path`.
pub fn find_in_path(plugin: &str, cni_path: &str) -> Result<PathBuf, String> {
    if plugin.is_empty() {
        return Err("no plugin name provided".to_string());
    }
    if plugin.contains('/') {
        return Err(format!("invalid plugin name: {plugin}"));
    }
    // filepath.SplitList: nothing for an empty string, else every piece (an empty one is ".").
    let dirs: Vec<&str> = if cni_path.is_empty() { Vec::new() } else { cni_path.split(':').collect() };
    if dirs.is_empty() {
        return Err("no paths provided".to_string());
    }
    for dir in &dirs {
        let candidate = Path::new(dir).join(plugin);
        if std::fs::metadata(&candidate).is_ok_and(|m| m.is_file()) {
            return Ok(candidate);
        }
    }
    Err(format!("failed to find plugin {} in path [{}]", go_quote(plugin), dirs.join(" ")))
}

/// Runs `plugin` (found in `cni_path`) with `command` and `stdin`; returns its stdout. A
/// failing plugin's error JSON comes back as [`Failure::Cni`], unchanged.
pub fn delegate(
    plugin: &str,
    command: &str,
    stdin: &[u8],
    cni_path: &str,
    env: &[(OsString, OsString)],
    stderr: &mut dyn Write,
) -> Result<Vec<u8>, Failure> {
    let path = find_in_path(plugin, cni_path)?;
    exec_plugin(&path, command, stdin, env, stderr)
}

/// `RawExec.ExecPlugin`.
pub fn exec_plugin(
    path: &Path,
    command: &str,
    stdin: &[u8],
    env: &[(OsString, OsString)],
    stderr: &mut dyn Write,
) -> Result<Vec<u8>, Failure> {
    let mut attempt = 0;
    let mut child = loop {
        let spawned = Command::new(path)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("CNI_COMMAND", command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            Ok(child) => break child,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < BUSY_RETRIES => {
                attempt += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => {
                let msg =
                    format!("netplugin failed with no error message: fork/exec {}: {}", path.display(), go_errno(&e));
                return Err(Failure::Cni(CniError::new(0, msg, "")));
            }
        }
    };
    // Feed stdin from another thread so a plugin writing a lot before reading cannot block us;
    // a plugin that exits without reading it is fine.
    let mut pipe = child.stdin.take().expect("stdin is piped");
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let output = child.wait_with_output().map_err(|e| format!("waiting for {}: {}", path.display(), go_errno(&e)));
    let _ = writer.join();
    let output = output?;
    if !output.status.success() {
        return Err(Failure::Cni(plugin_error(output.status, &output.stdout, &output.stderr)));
    }
    if !output.stderr.is_empty() {
        let _ = stderr.write_all(&output.stderr);
    }
    Ok(output.stdout)
}

/// `RawExec.pluginErr`: the plugin's error JSON, or a message built from what it printed.
fn plugin_error(status: ExitStatus, stdout: &[u8], stderr: &[u8]) -> CniError {
    if stdout.is_empty() {
        let msg = if stderr.is_empty() {
            format!("netplugin failed with no error message: {}", go_exit_status(status))
        } else {
            format!("netplugin failed: {}", go_quote(&String::from_utf8_lossy(stderr)))
        };
        return CniError::new(0, msg, "");
    }
    let mut error = CniError::new(0, "", "");
    if let Err(e) = decode_error(stdout, &mut error) {
        error.msg = format!(
            "netplugin failed but error parsing its diagnostic message {}: {e}",
            go_quote(&String::from_utf8_lossy(stdout))
        );
    }
    error
}

/// `json.Unmarshal(stdout, &types.Error{})`: fills what it can, returns the first problem.
fn decode_error(stdout: &[u8], error: &mut CniError) -> Result<(), String> {
    let entries = match gojson::parse(stdout)? {
        Json::Null => return Ok(()),
        Json::Object(entries) => entries,
        other => return Err(format!("json: cannot unmarshal {} into Go value of type types.Error", other.kind())),
    };
    let mut first_error = None;
    for (key, value) in &entries {
        let result = if gojson::key_matches(key, "code") {
            gojson::decode_uint(value, &mut error.code)
                .map_err(|e| format!("json: cannot unmarshal {e} into Go struct field Error.code of type uint"))
        } else if gojson::key_matches(key, "msg") {
            super::spec::decode_string(value, "Error.msg", &mut error.msg)
        } else if gojson::key_matches(key, "details") {
            super::spec::decode_string(value, "Error.details", &mut error.details)
        } else {
            Ok(())
        };
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// An `*exec.ExitError` as Go prints it.
fn go_exit_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit status {code}");
    }
    let signal = status.signal().unwrap_or(0);
    let name = match signal {
        libc::SIGHUP => "hangup".to_string(),
        libc::SIGINT => "interrupt".to_string(),
        libc::SIGQUIT => "quit".to_string(),
        libc::SIGILL => "illegal instruction".to_string(),
        libc::SIGABRT => "aborted".to_string(),
        libc::SIGBUS => "bus error".to_string(),
        libc::SIGFPE => "floating point exception".to_string(),
        libc::SIGKILL => "killed".to_string(),
        libc::SIGSEGV => "segmentation fault".to_string(),
        libc::SIGPIPE => "broken pipe".to_string(),
        libc::SIGTERM => "terminated".to_string(),
        n => format!("signal {n}"),
    };
    format!("signal: {name}")
}

/// What ADD prints for the delegate's result (`fixupResultVersion` and `create.Create`): the
/// result must be a JSON object of a known version; one without a cniVersion gets the
/// config's (`config_version`). Otherwise the delegate's bytes are passed on as they are.
pub fn add_result(config_version: &str, stdout: Vec<u8>) -> Result<Vec<u8>, String> {
    let unmarshal = |e: String| format!("failed to unmarshal raw result: {e}");
    let mut map: BTreeMap<String, Value> = match gojson::parse(&stdout).map_err(unmarshal)? {
        Json::Null => BTreeMap::new(),
        Json::Object(entries) => entries.into_iter().map(|(k, v)| (k, v.into_value())).collect(),
        other => {
            return Err(unmarshal(format!(
                "json: cannot unmarshal {} into Go value of type map[string]interface {{}}",
                other.kind()
            )))
        }
    };
    let (version, bytes) = match map.get("cniVersion") {
        Some(Value::Str(v)) if !v.is_empty() => (v.clone(), stdout),
        _ => {
            map.insert("cniVersion".into(), Value::Str(config_version.to_string()));
            (config_version.to_string(), gojson::marshal(&Value::Map(map)).into_bytes())
        }
    };
    if !RESULT_VERSIONS.contains(&version.as_str()) {
        return Err(format!("unsupported CNI result version {}", go_quote(&version)));
    }
    Ok(bytes)
}

/// Reads all of `reader` (the plugin's own stdin).
pub fn read_all(reader: &mut dyn Read) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    reader.read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn finds_plugins_like_go() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::create_dir(a.path().join("bridge")).unwrap(); // a directory is not a plugin
        let plugin = script(b.path(), "bridge", "true");
        let path = format!("{}:{}", a.path().display(), b.path().display());
        assert_eq!(find_in_path("bridge", &path).unwrap(), plugin);
        assert_eq!(
            find_in_path("macvlan", &path).unwrap_err(),
            format!("failed to find plugin \"macvlan\" in path [{} {}]", a.path().display(), b.path().display())
        );
        assert_eq!(find_in_path("", &path).unwrap_err(), "no plugin name provided");
        assert_eq!(find_in_path("../bridge", &path).unwrap_err(), "invalid plugin name: ../bridge");
        assert_eq!(find_in_path("bridge", "").unwrap_err(), "no paths provided");
    }

    #[test]
    fn runs_plugins_with_stdin_and_command() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = script(dir.path(), "echo", r#"echo "$CNI_COMMAND $CNI_IFNAME"; cat; echo warn >&2"#);
        let env = vec![("CNI_COMMAND".into(), "ADD".into()), ("CNI_IFNAME".into(), "eth0".into())];
        let mut stderr = Vec::new();
        let out = exec_plugin(&plugin, "DEL", b"{\"a\":1}", &env, &mut stderr).unwrap();
        assert_eq!(out, b"DEL eth0\n{\"a\":1}");
        assert_eq!(stderr, b"warn\n");
    }

    #[test]
    fn plugin_failures() {
        let dir = tempfile::tempdir().unwrap();
        let mut stderr = Vec::new();
        let run = |body: &str, stderr: &mut Vec<u8>| {
            let plugin = script(dir.path(), "p", body);
            exec_plugin(&plugin, "ADD", b"", &[], stderr).unwrap_err()
        };
        assert_eq!(
            run(r#"echo '{"cniVersion":"0.3.1","code":7,"msg":"bad","details":"d"}'; exit 1"#, &mut stderr),
            Failure::Cni(CniError::new(7, "bad", "d"))
        );
        assert_eq!(
            run("exit 3", &mut stderr),
            Failure::Cni(CniError::new(0, "netplugin failed with no error message: exit status 3", ""))
        );
        assert_eq!(
            run("echo oops >&2; exit 1", &mut stderr),
            Failure::Cni(CniError::new(0, "netplugin failed: \"oops\\n\"", ""))
        );
        assert_eq!(
            run(r#"echo '{"code":"x","msg":"m","details":"d"}'; exit 1"#, &mut stderr),
            Failure::Cni(CniError::new(
                0,
                "netplugin failed but error parsing its diagnostic message \"{\\\"code\\\":\\\"x\\\",\\\"msg\\\":\\\"m\\\",\\\"details\\\":\\\"d\\\"}\\n\": json: cannot unmarshal string into Go struct field Error.code of type uint",
                "d"
            ))
        );
        assert_eq!(
            run("kill -9 $$", &mut stderr),
            Failure::Cni(CniError::new(0, "netplugin failed with no error message: signal: killed", ""))
        );
        assert!(stderr.is_empty());
        let missing = dir.path().join("missing");
        let Failure::Cni(e) = exec_plugin(&missing, "ADD", b"", &[], &mut stderr).unwrap_err() else { panic!() };
        assert!(e.msg.ends_with("missing: no such file or directory"), "{}", e.msg);
    }

    #[test]
    fn results() {
        let r = br#"{"cniVersion":"0.3.1","ips":[]}"#.to_vec();
        assert_eq!(add_result("0.3.1", r.clone()).unwrap(), r);
        assert_eq!(add_result("0.4.0", br#"{"ips":[]}"#.to_vec()).unwrap(), br#"{"cniVersion":"0.4.0","ips":[]}"#);
        assert_eq!(
            add_result("0.3.1", br#"{"cniVersion":"9.9.9"}"#.to_vec()).unwrap_err(),
            "unsupported CNI result version \"9.9.9\""
        );
        assert_eq!(
            add_result("0.3.1", b"".to_vec()).unwrap_err(),
            "failed to unmarshal raw result: unexpected end of JSON input"
        );
        assert!(add_result("0.3.1", b"[]".to_vec()).is_err());
    }
}
