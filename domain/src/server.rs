//! The server: its lifecycle from order to deletion. Billing reads `is_billable`.

use chrono::{DateTime, Duration, Utc};
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::types::{AccountId, Hostname, HourSlot, Location, OrderId, PlanId, ServerId};

pub const GRACE_CANCELLATION_DAYS: i64 = 30;
pub const IMMEDIATE_CANCELLATION_MINUTES: i64 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Provisioning,
    NeedsSetup,
    Running,
    Stopped,
    Suspended,
    PendingCancellation,
    Deleting,
    Deleted,
    Failed,
}

impl Status {
    pub const ALL: [Status; 9] = [
        Status::Provisioning,
        Status::NeedsSetup,
        Status::Running,
        Status::Stopped,
        Status::Suspended,
        Status::PendingCancellation,
        Status::Deleting,
        Status::Deleted,
        Status::Failed,
    ];

    pub fn parse(text: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|status| status.as_str() == text)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Provisioning => "provisioning",
            Status::NeedsSetup => "needs_setup",
            Status::Running => "running",
            Status::Stopped => "stopped",
            Status::Suspended => "suspended",
            Status::PendingCancellation => "pending_cancellation",
            Status::Deleting => "deleting",
            Status::Deleted => "deleted",
            Status::Failed => "failed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancellationMode {
    Grace,
    Immediate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    Boot,
    Shutdown,
    Reboot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuspensionReason {
    NonPayment,
    Dispute,
}

impl SuspensionReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            SuspensionReason::NonPayment => "non_payment",
            SuspensionReason::Dispute => "dispute",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ServerEvent {
    ServerOrdered {
        server_id: ServerId,
        account_id: AccountId,
        order_id: OrderId,
        plan_id: PlanId,
        location: Location,
        at: DateTime<Utc>,
    },
    ProvisioningFailed {
        reason: String,
        at: DateTime<Utc>,
    },
    ServerProvisioned {
        provider_server_id: String,
        at: DateTime<Utc>,
    },
    SetupCompleted {
        os_image: String,
        hostname: Hostname,
        at: DateTime<Utc>,
    },
    Reinstalled {
        os_image: String,
        at: DateTime<Utc>,
    },
    PowerChanged {
        action: PowerAction,
        powered_on: bool,
        at: DateTime<Utc>,
    },
    ServerSuspended {
        reason: SuspensionReason,
        at: DateTime<Utc>,
    },
    ServerResumed {
        at: DateTime<Utc>,
    },
    CancellationRequested {
        mode: CancellationMode,
        requested_at: DateTime<Utc>,
        effective_at: DateTime<Utc>,
        /// A grace cancellation of a running server powers it off at the provider.
        #[serde(default)]
        power_off: bool,
    },
    CancellationRevoked {
        at: DateTime<Utc>,
        /// Whether the server is on again (as it was before its cancellation); absent in events
        /// recorded before this was kept, which meant "on if set up".
        #[serde(default)]
        powered_on: Option<bool>,
        /// Power it on at the provider (it is on again and not suspended).
        #[serde(default)]
        boot: bool,
    },
    ServerDeleted {
        at: DateTime<Utc>,
    },
    TerminatedForNonPayment {
        suspended_since: DateTime<Utc>,
        at: DateTime<Utc>,
    },
}

impl DomainEvent for ServerEvent {
    fn event_type(&self) -> String {
        match self {
            ServerEvent::ServerOrdered { .. } => "ServerOrdered",
            ServerEvent::ProvisioningFailed { .. } => "ProvisioningFailed",
            ServerEvent::ServerProvisioned { .. } => "ServerProvisioned",
            ServerEvent::SetupCompleted { .. } => "SetupCompleted",
            ServerEvent::Reinstalled { .. } => "Reinstalled",
            ServerEvent::PowerChanged { .. } => "PowerChanged",
            ServerEvent::ServerSuspended { .. } => "ServerSuspended",
            ServerEvent::ServerResumed { .. } => "ServerResumed",
            ServerEvent::CancellationRequested { .. } => "CancellationRequested",
            ServerEvent::CancellationRevoked { .. } => "CancellationRevoked",
            ServerEvent::ServerDeleted { .. } => "ServerDeleted",
            ServerEvent::TerminatedForNonPayment { .. } => "TerminatedForNonPayment",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ServerCommand {
    Order {
        server_id: ServerId,
        account_id: AccountId,
        order_id: OrderId,
        plan_id: PlanId,
        location: Location,
        at: DateTime<Utc>,
    },
    FailProvisioning {
        reason: String,
        at: DateTime<Utc>,
    },
    CompleteProvisioning {
        provider_server_id: String,
        at: DateTime<Utc>,
    },
    Setup {
        os_image: String,
        hostname: Hostname,
        at: DateTime<Utc>,
    },
    Reinstall {
        os_image: String,
        at: DateTime<Utc>,
    },
    Power {
        action: PowerAction,
        at: DateTime<Utc>,
    },
    Suspend {
        reason: SuspensionReason,
        at: DateTime<Utc>,
    },
    Resume {
        at: DateTime<Utc>,
    },
    RequestCancellation {
        mode: CancellationMode,
        at: DateTime<Utc>,
    },
    RevokeCancellation {
        at: DateTime<Utc>,
    },
    Delete {
        at: DateTime<Utc>,
    },
    TerminateForNonPayment {
        unpaid_days: i64,
        at: DateTime<Utc>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    #[error("the server already exists")]
    AlreadyExists,
    #[error("no such server")]
    NotFound,
    #[error("the server is {0}, which does not allow this")]
    WrongStatus(&'static str),
    #[error("the server is already set up; reinstall instead")]
    AlreadySetUp,
    #[error("the server has not been set up yet")]
    NotSetUp,
    #[error("{0}")]
    Invalid(String),
    #[error("the server is already {0}")]
    AlreadyInPowerState(&'static str),
    #[error("the server is already suspended")]
    AlreadySuspended,
    #[error("the server is not suspended")]
    NotSuspended,
    #[error("the server has no pending cancellation")]
    NotCancelled,
    #[error("the server is already being cancelled")]
    AlreadyCancelled,
    #[error("an immediate cancellation cannot be revoked")]
    ImmediateNotRevocable,
    #[error("the deletion is due at {0}; it can no longer be revoked")]
    DeletionDue(DateTime<Utc>),
    #[error("the deletion is not due before {0}")]
    DeletionNotDue(DateTime<Utc>),
    #[error("the server is not suspended for non-payment long enough (since {0})")]
    NotOverdue(DateTime<Utc>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cancellation {
    pub mode: CancellationMode,
    pub requested_at: DateTime<Utc>,
    pub effective_at: DateTime<Utc>,
    /// Whether the server was on when cancelled: a revocation puts it back as it was.
    #[serde(default)]
    pub powered_on_before: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Server {
    pub ordered: Option<Ordered>,
    pub provisioned_at: Option<DateTime<Utc>>,
    pub provider_server_id: Option<String>,
    pub failed: bool,
    pub hostname: Option<Hostname>,
    pub os_image: Option<String>,
    pub powered_on: bool,
    pub suspended: Option<(SuspensionReason, DateTime<Utc>)>,
    pub cancellation: Option<Cancellation>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// When the server last became billable (provisioned, resumed or its cancellation revoked):
    /// no slot that ended before it is ever charged, whatever a read model says is due.
    #[serde(default)]
    pub billable_since: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ordered {
    pub server_id: ServerId,
    pub account_id: AccountId,
    pub order_id: OrderId,
    pub plan_id: PlanId,
    pub location: Location,
    pub at: DateTime<Utc>,
}

impl Server {
    pub fn status(&self) -> Option<Status> {
        self.ordered.as_ref()?;
        Some(if self.deleted_at.is_some() {
            Status::Deleted
        } else if self.failed {
            Status::Failed
        } else if self.provisioned_at.is_none() {
            Status::Provisioning
        } else if let Some(cancellation) = &self.cancellation {
            match cancellation.mode {
                CancellationMode::Grace => Status::PendingCancellation,
                CancellationMode::Immediate => Status::Deleting,
            }
        } else if self.suspended.is_some() {
            Status::Suspended
        } else if self.os_image.is_none() {
            Status::NeedsSetup
        } else if self.powered_on {
            Status::Running
        } else {
            Status::Stopped
        })
    }

    /// Billed from provisioning until cancellation, suspension or deletion (a stopped server is billed).
    pub fn is_billable(&self) -> bool {
        matches!(self.status(), Some(Status::NeedsSetup | Status::Running | Status::Stopped))
    }

    /// The first slot billing may charge since the server last became billable: the slot in which
    /// it was provisioned, resumed or revoked. None while it is not billable.
    pub fn first_billable_slot(&self) -> Option<HourSlot> {
        if !self.is_billable() {
            return None;
        }
        self.billable_since.or(self.provisioned_at).map(HourSlot::containing)
    }

    /// Whether `slot` may be charged now: the server is billable and has been since the slot.
    pub fn may_bill(&self, slot: HourSlot) -> bool {
        self.first_billable_slot().is_some_and(|first| slot >= first)
    }

    /// Why the server is suspended, and since when.
    pub fn suspension(&self) -> Option<(SuspensionReason, DateTime<Utc>)> {
        self.suspended
    }

    /// The suspension that holds the server now: none once it is cancelled, deleted or failed
    /// (it is shown as that, and no longer waits for a payment or a dispute).
    pub fn suspension_in_force(&self) -> Option<(SuspensionReason, DateTime<Utc>)> {
        self.suspended.filter(|_| self.status() == Some(Status::Suspended))
    }

    fn decide(&self, command: ServerCommand) -> Result<Vec<ServerEvent>, ServerError> {
        if let ServerCommand::Order {
            server_id,
            account_id,
            order_id,
            plan_id,
            location,
            at,
        } = command
        {
            if self.ordered.is_some() {
                return Err(ServerError::AlreadyExists);
            }
            return Ok(vec![ServerEvent::ServerOrdered {
                server_id,
                account_id,
                order_id,
                plan_id,
                location,
                at,
            }]);
        }
        let status = self.status().ok_or(ServerError::NotFound)?;
        let wrong = || ServerError::WrongStatus(status.as_str());
        match command {
            ServerCommand::Order { .. } => unreachable!("handled above"),
            ServerCommand::FailProvisioning { reason, at } => match status {
                Status::Provisioning => Ok(vec![ServerEvent::ProvisioningFailed { reason, at }]),
                _ => Err(wrong()),
            },
            ServerCommand::CompleteProvisioning { provider_server_id, at } => match status {
                Status::Provisioning => Ok(vec![ServerEvent::ServerProvisioned { provider_server_id, at }]),
                _ => Err(wrong()),
            },
            ServerCommand::Setup { os_image, hostname, at } => {
                check_image(&os_image)?;
                match status {
                    Status::NeedsSetup => Ok(vec![ServerEvent::SetupCompleted { os_image, hostname, at }]),
                    Status::Running | Status::Stopped => Err(ServerError::AlreadySetUp),
                    _ => Err(wrong()),
                }
            }
            ServerCommand::Reinstall { os_image, at } => {
                check_image(&os_image)?;
                match status {
                    Status::Running | Status::Stopped => Ok(vec![ServerEvent::Reinstalled { os_image, at }]),
                    Status::NeedsSetup => Err(ServerError::NotSetUp),
                    _ => Err(wrong()),
                }
            }
            ServerCommand::Power { action, at } => {
                match status {
                    Status::Running | Status::Stopped => {}
                    Status::NeedsSetup => return Err(ServerError::NotSetUp),
                    _ => return Err(wrong()),
                }
                let powered_on = match (action, self.powered_on) {
                    (PowerAction::Boot, true) => return Err(ServerError::AlreadyInPowerState("running")),
                    (PowerAction::Shutdown | PowerAction::Reboot, false) => return Err(ServerError::AlreadyInPowerState("stopped")),
                    (PowerAction::Boot | PowerAction::Reboot, _) => true,
                    (PowerAction::Shutdown, _) => false,
                };
                Ok(vec![ServerEvent::PowerChanged { action, powered_on, at }])
            }
            ServerCommand::Suspend { reason, at } => match status {
                Status::NeedsSetup | Status::Running | Status::Stopped => Ok(vec![ServerEvent::ServerSuspended { reason, at }]),
                Status::Suspended => Err(ServerError::AlreadySuspended),
                _ => Err(wrong()),
            },
            ServerCommand::Resume { at } => match status {
                Status::Suspended => Ok(vec![ServerEvent::ServerResumed { at }]),
                _ => Err(ServerError::NotSuspended),
            },
            ServerCommand::RequestCancellation { mode, at } => match status {
                Status::NeedsSetup | Status::Running | Status::Stopped | Status::Suspended => {
                    let effective_at = match mode {
                        CancellationMode::Grace => at + Duration::days(GRACE_CANCELLATION_DAYS),
                        CancellationMode::Immediate => at + Duration::minutes(IMMEDIATE_CANCELLATION_MINUTES),
                    };
                    Ok(vec![ServerEvent::CancellationRequested {
                        mode,
                        requested_at: at,
                        effective_at,
                        power_off: mode == CancellationMode::Grace && self.powered_on && self.suspended.is_none(),
                    }])
                }
                Status::PendingCancellation | Status::Deleting => Err(ServerError::AlreadyCancelled),
                _ => Err(wrong()),
            },
            ServerCommand::RevokeCancellation { at } => {
                let cancellation = self.cancellation.as_ref().ok_or(ServerError::NotCancelled)?;
                if status == Status::Deleted {
                    return Err(wrong());
                }
                if cancellation.mode == CancellationMode::Immediate {
                    return Err(ServerError::ImmediateNotRevocable);
                }
                if at >= cancellation.effective_at {
                    return Err(ServerError::DeletionDue(cancellation.effective_at));
                }
                let powered_on = cancellation.powered_on_before && self.os_image.is_some();
                Ok(vec![ServerEvent::CancellationRevoked {
                    at,
                    powered_on: Some(powered_on),
                    boot: powered_on && self.suspended.is_none(),
                }])
            }
            ServerCommand::Delete { at } => {
                let cancellation = self.cancellation.as_ref().ok_or(ServerError::NotCancelled)?;
                if status == Status::Deleted {
                    return Err(wrong());
                }
                if at < cancellation.effective_at {
                    return Err(ServerError::DeletionNotDue(cancellation.effective_at));
                }
                Ok(vec![ServerEvent::ServerDeleted { at }])
            }
            ServerCommand::TerminateForNonPayment { unpaid_days, at } => match (status, self.suspended) {
                (Status::Suspended, Some((SuspensionReason::NonPayment, since))) => {
                    if at - since < Duration::days(unpaid_days) {
                        return Err(ServerError::NotOverdue(since));
                    }
                    Ok(vec![ServerEvent::TerminatedForNonPayment {
                        suspended_since: since,
                        at,
                    }])
                }
                _ => Err(wrong()),
            },
        }
    }
}

fn check_image(os_image: &str) -> Result<(), ServerError> {
    let valid = !os_image.is_empty()
        && os_image.len() <= 64
        && os_image
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(ServerError::Invalid(format!(
            "os_image {os_image:?} is not an image name (letters, digits, - . _)"
        )))
    }
}

impl Aggregate for Server {
    const TYPE: &'static str = "server";
    type Command = ServerCommand;
    type Event = ServerEvent;
    type Error = ServerError;
    type Services = ();

    async fn handle(&mut self, command: ServerCommand, _: &(), sink: &cqrs_es::event_sink::EventSink<Self>) -> Result<(), ServerError> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: ServerEvent) {
        match event {
            ServerEvent::ServerOrdered {
                server_id,
                account_id,
                order_id,
                plan_id,
                location,
                at,
            } => {
                self.ordered = Some(Ordered {
                    server_id,
                    account_id,
                    order_id,
                    plan_id,
                    location,
                    at,
                });
            }
            ServerEvent::ProvisioningFailed { .. } => self.failed = true,
            ServerEvent::ServerProvisioned { provider_server_id, at } => {
                self.provisioned_at = Some(at);
                self.billable_since = Some(at);
                self.provider_server_id = Some(provider_server_id);
            }
            ServerEvent::SetupCompleted { os_image, hostname, .. } => {
                self.os_image = Some(os_image);
                self.hostname = Some(hostname);
                self.powered_on = true;
            }
            ServerEvent::Reinstalled { os_image, .. } => {
                self.os_image = Some(os_image);
                self.powered_on = true;
            }
            ServerEvent::PowerChanged { powered_on, .. } => self.powered_on = powered_on,
            ServerEvent::ServerSuspended { reason, at } => self.suspended = Some((reason, at)),
            ServerEvent::ServerResumed { at } => {
                self.suspended = None;
                self.billable_since = Some(at);
            }
            ServerEvent::CancellationRequested {
                mode,
                requested_at,
                effective_at,
                ..
            } => {
                self.cancellation = Some(Cancellation {
                    mode,
                    requested_at,
                    effective_at,
                    powered_on_before: self.powered_on,
                });
                // Powered off while it waits (grace) or is being deleted (immediate).
                self.powered_on = false;
            }
            ServerEvent::CancellationRevoked { at, powered_on, .. } => {
                self.cancellation = None;
                self.powered_on = powered_on.unwrap_or(self.os_image.is_some());
                self.billable_since = Some(at);
            }
            ServerEvent::ServerDeleted { at } | ServerEvent::TerminatedForNonPayment { at, .. } => {
                self.deleted_at = Some(at);
                self.powered_on = false;
            }
        }
    }
}
