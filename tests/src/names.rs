//! Names unique to this process and call, short enough for interface names (15 bytes).

use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// `<tag><pid base36><counter>`, e.g. `flv3k9z1`; `tag` should be at most 4 bytes so the
/// result stays a valid interface name.
pub fn unique(tag: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{tag}{}{n}", base36(std::process::id()))
}

fn base36(mut v: u32) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

#[cfg(test)]
mod tests {
    #[test]
    fn unique_names_differ_and_fit_interface_names() {
        let a = super::unique("flv");
        let b = super::unique("flv");
        assert_ne!(a, b);
        assert!(a.len() < 16, "{a} too long for an interface name");
    }
}
