//! The floor under the steering program: an `SK_REUSEPORT` program that
//! only selects (`bpf_sk_select_reuseport` into a socket array of its own,
//! by the packet hash) and returns. Every steering decision ends in that
//! call, so what this costs per datagram on a machine is what no steering
//! program can go below there; `overhead-udp --mode select-only` measures
//! it the same way as the real program.
//!
//! Written as a dozen BPF instructions and loaded with the `bpf` syscall:
//! it needs no maps but its socket array, and keeping it out of the
//! product's object keeps the object what reloader loads. (A socket can be
//! in one socket array only — the kernel marks it through `sk_user_data` —
//! so the reference uses sockets of its own.)

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;
const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
const BPF_FUNC_SK_SELECT_REUSEPORT: i32 = 82;
const BPF_PSEUDO_MAP_FD: u8 = 1;
/// `offsetof(struct sk_reuseport_md, hash)`.
const MD_HASH: i16 = 32;
const SK_PASS: i32 = 1;

/// The program and its socket array; the program is detached by closing
/// the sockets or by `SO_DETACH_REUSEPORT_BPF`.
pub struct SelectOnly {
    _map: OwnedFd,
    prog: OwnedFd,
}

/// One instruction: `code`, `dst`, `src`, `off`, `imm`.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | (u64::from(dst | (src << 4)) << 8)
        | (u64::from(off as u16) << 16)
        | (u64::from(imm as u32) << 32)
}

fn bpf(cmd: libc::c_long, attr: &[u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid `union bpf_attr` prefix of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), attr.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the commands used here return a new descriptor, owned here
    // (BPF_MAP_UPDATE_ELEM returns 0, handled by its caller).
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

fn put(attr: &mut [u8], at: usize, bytes: &[u8]) {
    attr[at..at + bytes.len()].copy_from_slice(bytes);
}

impl SelectOnly {
    /// Loads the program over a socket array holding `sockets` (members of
    /// one reuseport group, bound).
    pub fn load(sockets: &[BorrowedFd<'_>]) -> std::io::Result<Self> {
        let n = sockets.len() as u32;
        // union bpf_attr, BPF_MAP_CREATE: map_type, key_size, value_size,
        // max_entries.
        let mut attr = [0u8; 20];
        put(
            &mut attr,
            0,
            &BPF_MAP_TYPE_REUSEPORT_SOCKARRAY.to_ne_bytes(),
        );
        put(&mut attr, 4, &4u32.to_ne_bytes());
        put(&mut attr, 8, &8u32.to_ne_bytes());
        put(&mut attr, 12, &n.to_ne_bytes());
        let map = bpf(BPF_MAP_CREATE, &attr)?;
        for (i, socket) in sockets.iter().enumerate() {
            let key = i as u32;
            let value = socket.as_raw_fd() as u64;
            // BPF_MAP_UPDATE_ELEM: map_fd, (pad), key, value, flags.
            let mut attr = [0u8; 32];
            put(&mut attr, 0, &(map.as_raw_fd() as u32).to_ne_bytes());
            put(&mut attr, 8, &(&raw const key as u64).to_ne_bytes());
            put(&mut attr, 16, &(&raw const value as u64).to_ne_bytes());
            // SAFETY: as in `bpf`; this command returns 0, not a descriptor.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_UPDATE_ELEM,
                    attr.as_ptr(),
                    attr.len(),
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let fd = map.as_raw_fd();
        let program = [
            insn(0xbf, 6, 1, 0, 0),                  // r6 = r1 (ctx)
            insn(0x61, 2, 1, MD_HASH, 0),            // r2 = ctx->hash
            insn(0x94, 2, 0, 0, n as i32),           // w2 %= n
            insn(0x63, 10, 2, -4, 0),                // *(u32 *)(r10 - 4) = r2
            insn(0xbf, 1, 6, 0, 0),                  // r1 = ctx
            insn(0x18, 2, BPF_PSEUDO_MAP_FD, 0, fd), // r2 = &map (two slots)
            insn(0, 0, 0, 0, 0),
            insn(0xbf, 3, 10, 0, 0), // r3 = r10
            insn(0x07, 3, 0, 0, -4), // r3 += -4
            insn(0xb7, 4, 0, 0, 0),  // r4 = 0 (flags)
            insn(0x85, 0, 0, 0, BPF_FUNC_SK_SELECT_REUSEPORT),
            insn(0xb7, 0, 0, 0, SK_PASS), // r0 = SK_PASS
            insn(0x95, 0, 0, 0, 0),       // exit
        ];
        let license = c"GPL";
        // BPF_PROG_LOAD: prog_type, insn_cnt, insns, license (the rest
        // zero: no log, no name, expected_attach_type 0 = select only).
        let mut attr = [0u8; 72];
        put(&mut attr, 0, &BPF_PROG_TYPE_SK_REUSEPORT.to_ne_bytes());
        put(&mut attr, 4, &(program.len() as u32).to_ne_bytes());
        put(&mut attr, 8, &(program.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 16, &(license.as_ptr() as u64).to_ne_bytes());
        let prog = bpf(BPF_PROG_LOAD, &attr)?;
        Ok(Self { _map: map, prog })
    }

    /// Attaches the program to the reuseport group of `socket`.
    pub fn attach(&self, socket: BorrowedFd<'_>) -> std::io::Result<()> {
        let fd = self.prog.as_raw_fd();
        // SAFETY: a valid int option value for SO_ATTACH_REUSEPORT_EBPF.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_REUSEPORT_EBPF,
                (&raw const fd).cast(),
                size_of_val(&fd) as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
