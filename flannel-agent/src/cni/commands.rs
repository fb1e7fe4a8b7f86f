//! ADD and DEL (flannel's `cmdAdd`, `cmdDel`). CHECK is handled in [`super::run`]: as in
//! flannel it does nothing beyond the protocol's version checks.

use std::{ffi::OsString, io::Write};

use super::{
    delegate, exec, netconf,
    spec::{self, CmdArgs, Failure},
    subnet_file,
};
use crate::gojson::{self, Value};

/// What a command works with.
pub struct Ctx<'a> {
    pub args: &'a CmdArgs,
    /// The network config from stdin.
    pub stdin: &'a [u8],
    /// The plugin's environment, handed to the delegate.
    pub env: &'a [(OsString, OsString)],
    pub stdout: &'a mut dyn Write,
    pub stderr: &'a mut dyn Write,
}

/// ADD: build the delegate config, save it under dataDir, run the delegate's ADD and print
/// its result. The saved file stays when the delegate fails, as in flannel: the runtime's DEL
/// after a failed ADD needs it to clean up.
pub fn add(ctx: &mut Ctx) -> Result<(), Failure> {
    let conf = netconf::load(ctx.stdin).map_err(|e| format!("failed to load flannel netconf file: {e}"))?;
    let env = subnet_file::load(&conf.subnet_file).map_err(|e| {
        format!("failed to load flannel 'subnet.env' file: {e}. Check the flannel pod log for this node.")
    })?;
    let delegate = delegate::build(&conf, &env)?;
    let plugin = match delegate.get("type") {
        Some(Value::Str(t)) => t.clone(),
        _ => unreachable!("build sets a string type"),
    };
    let bytes = gojson::marshal(&Value::Map(delegate));
    let _ = writeln!(ctx.stderr, "delegateAdd: netconf sent to delegate plugin:\n{bytes}");

    delegate::save(&conf.data_dir, &ctx.args.container_id, bytes.as_bytes())?;

    let add = |e: Failure| e.context("failed to delegate add");
    let out = exec::delegate(&plugin, "ADD", bytes.as_bytes(), &ctx.args.path, ctx.env, ctx.stderr).map_err(add)?;
    let version = spec::decode_version(bytes.as_bytes()).map_err(|e| add(e.into()))?;
    let result = exec::add_result(&version, out).map_err(|e| add(e.into()))?;
    ctx.stdout.write_all(&result).map_err(|e| format!("writing the result: {e}"))?;
    Ok(())
}

/// DEL: run the delegate's DEL with the config saved by ADD, then remove it. Nothing saved
/// means nothing to do. A saved file that does not decode is left alone and DEL succeeds (the
/// interface stays on the bridge until the node reboots), as in flannel. Unlike flannel (whose
/// deferred cleanup sees a nil error), the file is also kept when the delegate fails, so that
/// the runtime's retry can still release the address.
pub fn del(ctx: &mut Ctx) -> Result<(), Failure> {
    let conf = netconf::load(ctx.stdin)?;
    let Some(saved) = delegate::read_saved(&conf.data_dir, &ctx.args.container_id)? else {
        return Ok(());
    };
    let delegate_conf = match netconf::parse_plugin_conf(&saved) {
        Ok(c) => c,
        Err(e) => {
            let _ = write!(ctx.stderr, "failed to parse netconf: {e}");
            return Ok(());
        }
    };
    exec::delegate(&delegate_conf.plugin_type, "DEL", &saved, &ctx.args.path, ctx.env, ctx.stderr)?;
    delegate::remove_saved(&conf.data_dir, &ctx.args.container_id);
    Ok(())
}
