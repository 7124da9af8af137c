//! Functions the server hands to a client as callbacks for the length of one exchange (the
//! `receive` and `send` of an ASGI request): a client calls them at `<id>.<function>` on the
//! manager's address. Only the client they were handed to may call them, and they are gone
//! when the exchange's guard is dropped.

use std::sync::Arc;

use dashmap::DashMap;
use futures_util::future::BoxFuture;
use rmpv::Value;

use crate::error::Error;
use crate::rpc::value::Args;

/// The handler behind a set of exported functions.
pub(crate) trait Exported: Send + Sync {
    /// Runs `function` with the caller's arguments.
    fn call<'a>(&'a self, function: &'a str, args: &'a Args)
    -> BoxFuture<'a, Result<Value, Error>>;
}

struct Export {
    /// The only address that may call it (`ws/client`).
    caller: String,
    handler: Arc<dyn Exported>,
}

/// An export a call names: its handler and the function called.
pub(crate) struct Found<'m> {
    pub handler: Arc<dyn Exported>,
    pub function: &'m str,
}

/// The exported callbacks alive on this instance, by id.
#[derive(Default, Clone)]
pub(crate) struct Exports(Arc<DashMap<String, Export>>);

/// Keeps an export alive; dropping it withdraws the functions.
pub(crate) struct ExportGuard {
    exports: Exports,
    id: String,
}

impl ExportGuard {
    /// The method path a client calls for `function`.
    pub(crate) fn method(&self, function: &str) -> String {
        format!("{}.{function}", self.id)
    }
}

impl Drop for ExportGuard {
    fn drop(&mut self) {
        self.exports.0.remove(&self.id);
    }
}

impl Exports {
    /// Exports `handler` to the client at `caller` until the guard is dropped.
    pub(crate) fn export(&self, caller: String, handler: Arc<dyn Exported>) -> ExportGuard {
        let id = format!("export-{}", crate::ids::random_id(24));
        self.0.insert(id.clone(), Export { caller, handler });
        ExportGuard {
            exports: self.clone(),
            id,
        }
    }

    /// The handler and function a method path names, if it is an export; refused when the
    /// caller is not the client it was handed to.
    pub(crate) fn find<'m>(&self, method: &'m str, from: &str) -> Option<Result<Found<'m>, Error>> {
        let (id, function) = method.split_once('.')?;
        let export = self.0.get(id)?;
        Some(if export.caller == from {
            Ok(Found {
                handler: export.handler.clone(),
                function,
            })
        } else {
            Err(Error::PermissionDenied(
                "this callback belongs to another client".into(),
            ))
        })
    }
}
