//! Everything that touches BPF: the embedded object, bpffs pins and the programs.

pub mod bpffs;
pub mod decode;
pub mod inspect;
pub mod links;
pub mod object;
