//! Architecture-specific kernels, selected at run time by [`crate::isa::Isa`].

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;
