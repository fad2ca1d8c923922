//! The UpdateMachine seam: the router hands every decoded UpdateMachine request to an
//! [`UpdateMachineHandler`] held in `AppState`, and sends back whatever it answers.
//!
//! The upgrade engine implements the trait. Until then [`NotImplemented`] answers `Failure`, which
//! CAPI shows in the Machine's `Updating` condition and retries with backoff. An implementation must
//! return quickly (the call has a 10 to 30 s budget): start or look up the background job, then answer
//! `Success` with `retryAfterSeconds > 0` while it runs, `Success` with 0 when done, `Failure` on error.

use futures::future::BoxFuture;

use super::types::{HookResponse, UpdateMachineRequest, UpdateMachineResponse};

/// Answers UpdateMachine calls. `request.settings` holds the ExtensionConfig settings; read them with
/// [`super::settings::Settings::from_map`].
pub trait UpdateMachineHandler: Send + Sync + 'static {
    fn update_machine(&self, request: UpdateMachineRequest)
    -> BoxFuture<'_, UpdateMachineResponse>;
}

/// The placeholder until the upgrade engine lands.
#[derive(Debug, Clone, Copy, Default)]
pub struct NotImplemented;

/// The message [`NotImplemented`] answers with.
pub const NOT_IMPLEMENTED_MESSAGE: &str = "not implemented yet";

impl UpdateMachineHandler for NotImplemented {
    fn update_machine(
        &self,
        _request: UpdateMachineRequest,
    ) -> BoxFuture<'_, UpdateMachineResponse> {
        Box::pin(async { UpdateMachineResponse::failure(NOT_IMPLEMENTED_MESSAGE) })
    }
}
