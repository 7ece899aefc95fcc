//! `--inject-reuseport`: `cgroup/bind4` and `cgroup/bind6` programs
//! (`inject_bind4`, `inject_bind6`) attached to each generation's cgroup.
//! For a bind of a TCP or UDP socket to a managed address — protocol,
//! address and port exactly as the kernel sees them: the socket's family,
//! the address the server passed (a wildcard `0.0.0.0`/`::`, an
//! IPv4-mapped `::ffff:a.b.c.d` on an IPv6 socket) and the port — they set
//! `SO_REUSEPORT` on the socket before the bind takes effect, so a server
//! that does not set it itself can listen beside its previous generation.
//! Every other bind is left as the server made it, and the bind itself is
//! never refused (the programs always return 1).
//!
//! Kernel behaviour relied on (net/ipv4/af_inet.c `inet_bind`,
//! net/ipv6/af_inet6.c `inet6_bind`, net/core/filter.c
//! `sock_addr_func_proto`): the hook runs with the socket locked, before
//! `__inet_bind`/`__inet6_bind` checks `sk_reuseport` against the port's
//! other sockets; `bpf_setsockopt` is callable from the bind hooks and
//! takes `SOL_SOCKET`/`SO_REUSEPORT` there. The loader checks both on the
//! running kernel (a verifier that rejects the call, a setsockopt that
//! does not take the option) and refuses `--inject-reuseport` by name; see
//! docs/how-it-works.md, "Design notes", for the kernels verified.

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    EbpfContext,
    helpers::bpf_setsockopt,
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, PerCpuArray},
    programs::SockAddrContext,
};
use reloader_ebpf::{INJECT_FAILED, INJECTED as INJECTED_INDEX, ListenerKey};

/// The managed addresses (value unused), filled by the controller that
/// attached these programs.
#[map]
static INJECT_KEYS: HashMap<ListenerKey, u32> = HashMap::with_max_entries(1, 0);

/// Binds given `SO_REUSEPORT`, and binds where setting it failed.
#[map]
static INJECTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOL_SOCKET: i32 = 1;
const SO_REUSEPORT: i32 = 15;

#[cgroup_sock_addr(bind4)]
pub fn inject_bind4(ctx: SockAddrContext) -> i32 {
    // One volatile load per field at a constant offset from the context
    // (the verifier checks each context access by its offset).
    // SAFETY: `sock_addr` is the program's valid context for the whole run.
    let key = unsafe {
        let sa = ctx.sock_addr;
        ListenerKey {
            family: AF_INET,
            protocol: read_volatile(&raw const (*sa).protocol),
            port: port(read_volatile(&raw const (*sa).user_port)),
            addr: [read_volatile(&raw const (*sa).user_ip4), 0, 0, 0],
        }
    };
    inject(&ctx, &key)
}

#[cgroup_sock_addr(bind6)]
pub fn inject_bind6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in `inject_bind4`.
    let key = unsafe {
        let sa = ctx.sock_addr;
        ListenerKey {
            family: AF_INET6,
            protocol: read_volatile(&raw const (*sa).protocol),
            port: port(read_volatile(&raw const (*sa).user_port)),
            addr: [
                read_volatile(&raw const (*sa).user_ip6[0]),
                read_volatile(&raw const (*sa).user_ip6[1]),
                read_volatile(&raw const (*sa).user_ip6[2]),
                read_volatile(&raw const (*sa).user_ip6[3]),
            ],
        }
    };
    inject(&ctx, &key)
}

/// `user_port` holds the port in network byte order in its low 16 bits.
#[inline(always)]
fn port(user_port: u32) -> u32 {
    u32::from(u16::from_be(user_port as u16))
}

/// Sets `SO_REUSEPORT` when `key` is a managed address; always lets the
/// bind go on.
#[inline(always)]
fn inject(ctx: &SockAddrContext, key: &ListenerKey) -> i32 {
    // SAFETY: map values are plain integers.
    if unsafe { INJECT_KEYS.get(key) }.is_none() {
        return 1;
    }
    let mut one: i32 = 1;
    // SAFETY: the helper takes the program's own context and a pointer to
    // an int on the stack with its size.
    let rc = unsafe {
        bpf_setsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            SO_REUSEPORT,
            (&raw mut one).cast::<c_void>(),
            size_of::<i32>() as i32,
        )
    };
    let index = if rc == 0 {
        INJECTED_INDEX
    } else {
        INJECT_FAILED
    };
    if let Some(count) = INJECTED.get_ptr_mut(index) {
        // SAFETY: a per-CPU value; cgroup programs run with migration
        // disabled, so nothing else writes it concurrently.
        unsafe { *count += 1 };
    }
    1
}
