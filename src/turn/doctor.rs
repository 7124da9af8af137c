//! `hypha-rtc doctor`: the TURN setup checked from the server's side, step by step, with what
//! to change for each problem. The coturn this server probes (`--coturn-uri`) over UDP: STUN
//! binding, an allocation with freshly minted credentials (the shared secret), credentials that
//! expire in seconds (clock skew), the relayed address against the addresses clients are given
//! (the classic NAT misconfiguration) and whether the relay ports are reachable from here; then
//! every URL clients are given (UDP, TCP and TLS, with the certificate's names, expiry and
//! trust).

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use secrecy::SecretString;

use super::TurnSettings;
use super::ice::HostPort;
use super::probe::ProbeOutcome;
use super::stun::{self, Certificate, Client, Roots, Transport};

/// The doctor's own options.
#[derive(clap::Args, Debug, Clone)]
pub struct DoctorOptions {
    /// Extra trust anchors (PEM) for the turns: certificate, e.g. a private CA
    #[arg(long, value_name = "FILE")]
    pub ca_file: Vec<PathBuf>,
    /// Seconds each step may take
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub step_timeout: u64,
}

/// Credentials that expire this soon are refused by a coturn whose clock is further ahead.
const CLOCK_TTL: u64 = 5;
/// A certificate that expires sooner than this is reported.
const EXPIRY_WARNING_DAYS: i64 = 14;

/// What the doctor found: each problem with what to change, and the warnings.
#[derive(Debug, Default)]
pub struct Diagnosis {
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

impl Diagnosis {
    pub fn healthy(&self) -> bool {
        self.problems.is_empty()
    }
}

struct Doctor<'a> {
    out: &'a mut dyn Write,
    found: Diagnosis,
    step: Duration,
}

impl Doctor<'_> {
    fn say(&mut self, line: &str) {
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
    }

    fn ok(&mut self, what: &str) {
        self.say(&format!("  [ok]   {what}"));
    }

    fn problem(&mut self, what: &str, change: &str) {
        self.say(&format!("  [FAIL] {what}"));
        self.found.problems.push(format!("{what}: {change}"));
    }

    fn warn(&mut self, what: &str) {
        self.say(&format!("  [warn] {what}"));
        self.found.warnings.push(what.to_string());
    }

    /// Runs one step within the step time-out.
    async fn timed<T>(
        &self,
        step: &'static str,
        work: impl Future<Output = Result<T, ProbeOutcome>>,
    ) -> Result<(T, Duration), ProbeOutcome> {
        let started = Instant::now();
        match tokio::time::timeout(self.step, work).await {
            Ok(Ok(value)) => Ok((value, started.elapsed())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ProbeOutcome::TimedOut(step)),
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// What to change when a listener does not answer over `transport`.
fn unreachable_advice(transport: Transport) -> &'static str {
    match transport {
        Transport::Udp => {
            "start coturn, check its listening-port and listening-ip, and let UDP to that port through the firewall"
        }
        Transport::Tcp => {
            "clients behind networks that block UDP need TURN over TCP: check that coturn listens on TCP (no no-tcp) and that the firewall lets TCP to that port through"
        }
        Transport::Tls => {
            "check coturn's tls-listening-port, cert and pkey (and no no-tls), and that the firewall lets TCP to that port through"
        }
    }
}

/// Runs every check, writing progress to `out`; returns what was found.
pub async fn run(
    settings: &TurnSettings,
    options: &DoctorOptions,
    out: &mut dyn Write,
) -> Diagnosis {
    let mut doctor = Doctor {
        out,
        found: Diagnosis::default(),
        step: Duration::from_secs(options.step_timeout.max(1)),
    };
    let Some(coturn) = &settings.coturn else {
        doctor.say("hypha-rtc doctor: no coturn is configured.");
        doctor.problem(
            "this server hands out no TURN credentials",
            "set --coturn-uri (where this server reaches coturn) and --coturn-secret (coturn's static-auth-secret)",
        );
        return doctor.found;
    };
    let roots = match stun::roots(&options.ca_file) {
        Ok(roots) => Some(roots),
        Err(e) => {
            doctor.problem(
                &format!("the --ca-file cannot be used ({e})"),
                "give a PEM file of CA certificates",
            );
            None
        }
    };
    let public: Vec<String> = coturn.public.iter().map(|p| p.authority()).collect();
    doctor.say(&format!(
        "hypha-rtc doctor: coturn at {} (this server's probe); clients are given {}{}",
        coturn.internal.authority(),
        public.join(", "),
        coturn
            .tls_port
            .map(|p| format!(" and TLS on port {p}"))
            .unwrap_or_default()
    ));
    doctor.say(&format!(
        "\ncoturn at {} over UDP",
        coturn.internal.authority()
    ));
    // Where the public hosts resolve to, looked up once for the relay checks.
    let ips = public_ips(&coturn.public).await;
    let relayed = check_internal(&mut doctor, &coturn.internal, &coturn.secret, &ips).await;
    if let Some(relayed) = relayed {
        check_relayed_address(&mut doctor, relayed, &coturn.public, &ips);
    }
    doctor.say("\nWhat clients are given");
    for (target, transport) in coturn.listeners() {
        check_listener(
            &mut doctor,
            &target,
            transport,
            &coturn.secret,
            roots.as_ref(),
        )
        .await;
    }
    let found = doctor.found;
    let mut summary = String::new();
    if found.problems.is_empty() {
        summary.push_str("\nAll is well: clients get TURN credentials that coturn accepts, on every address they are given.\n");
    } else {
        summary.push_str(&format!("\n{} problem(s):\n", found.problems.len()));
        for (i, problem) in found.problems.iter().enumerate() {
            summary.push_str(&format!("  {}. {problem}\n", i + 1));
        }
    }
    if !found.warnings.is_empty() {
        summary.push_str(&format!("{} warning(s):\n", found.warnings.len()));
        for warning in &found.warnings {
            summary.push_str(&format!("  - {warning}\n"));
        }
    }
    let _ = write!(out, "{summary}");
    found
}

/// The probe's coturn over UDP: binding, allocation, clock, relay ports. Returns the relayed
/// address when the allocation worked.
async fn check_internal(
    doctor: &mut Doctor<'_>,
    target: &HostPort,
    secret: &SecretString,
    public: &[IpAddr],
) -> Option<SocketAddr> {
    let name = format!("{} (UDP)", target.authority());
    let connected = doctor
        .timed("connection", Client::connect(target, Transport::Udp, None))
        .await;
    let mut client = match connected {
        Ok(((client, _), _)) => client,
        Err(e) => {
            doctor.problem(
                &format!("{name}: {}", e.describe(target)),
                unreachable_advice(Transport::Udp),
            );
            return None;
        }
    };
    match doctor
        .timed("STUN binding request", stun::binding(&mut client))
        .await
    {
        Ok((mapped, took)) => doctor.ok(&format!(
            "STUN binding answered in {}; coturn sees this machine as {}",
            ms(took),
            mapped.map_or("an unknown address".into(), |m| m.to_string())
        )),
        Err(e) => {
            doctor.problem(&e.describe(target), unreachable_advice(Transport::Udp));
            return None;
        }
    }
    let (allocation, auth) = match doctor
        .timed(
            "TURN allocate request",
            stun::allocate(&mut client, secret, 300),
        )
        .await
    {
        Ok(((allocation, auth), took)) => {
            doctor.ok(&format!(
                "TURN allocation with freshly minted credentials accepted in {} (realm {:?}): --coturn-secret matches coturn's static-auth-secret",
                ms(took),
                allocation.realm
            ));
            (allocation, auth)
        }
        Err(ProbeOutcome::SecretRejected) => {
            doctor.problem(
                &format!("coturn at {} rejects credentials made with --coturn-secret", target.authority()),
                "make --coturn-secret equal to static-auth-secret in turnserver.conf (with use-auth-secret on)",
            );
            return None;
        }
        Err(e) => {
            doctor.problem(&e.describe(target), "check coturn's log for why it refuses allocations (user-quota, total-quota, allowed relay ports)");
            return None;
        }
    };
    check_clock(doctor, target, secret).await;
    let relayed = allocation.relayed;
    match relayed {
        Some(relayed) if public.contains(&relayed.ip()) => {
            check_relay_ports(doctor, &mut client, &auth, relayed).await;
        }
        Some(_) => {}
        None => doctor.problem(
            "coturn's allocation named no relayed address",
            "check coturn's relay-ip and that it has relay ports free (min-port, max-port)",
        ),
    }
    stun::release(&mut client, &auth).await;
    relayed
}

/// Credentials that expire in a few seconds: refused only by a coturn whose clock is ahead.
async fn check_clock(doctor: &mut Doctor<'_>, target: &HostPort, secret: &SecretString) {
    let attempt = async {
        let (mut client, _) = Client::connect(target, Transport::Udp, None).await?;
        let (_, auth) = stun::allocate(&mut client, secret, CLOCK_TTL).await?;
        stun::release(&mut client, &auth).await;
        Ok(())
    };
    match doctor.timed("clock check", attempt).await {
        Ok(_) => doctor.ok(&format!(
            "clocks agree: coturn accepts credentials that expire in {CLOCK_TTL} s"
        )),
        Err(ProbeOutcome::SecretRejected) => doctor.problem(
            &format!("coturn's clock is more than {CLOCK_TTL} s ahead of this machine's: it refuses credentials that have not expired yet"),
            "TURN credentials are time-based: run NTP (chrony, systemd-timesyncd) on this machine and coturn's",
        ),
        Err(e) => doctor.warn(&format!("the clock check did not finish: {}", e.describe(target))),
    }
}

/// The addresses the public hosts resolve to.
async fn public_ips(public: &[HostPort]) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for host in public {
        if let Ok(found) = tokio::net::lookup_host(host.authority()).await {
            ips.extend(found.map(|a| a.ip()));
        }
    }
    ips
}

/// The relayed address must be where clients reach coturn, or peers are sent to an address
/// they cannot reach.
fn check_relayed_address(
    doctor: &mut Doctor<'_>,
    relayed: SocketAddr,
    public: &[HostPort],
    ips: &[IpAddr],
) {
    if ips.contains(&relayed.ip()) {
        doctor.ok(&format!(
            "coturn relays at {}, an address clients are given",
            relayed.ip()
        ));
        return;
    }
    let given: Vec<String> = public.iter().map(|p| p.host.clone()).collect();
    let shown: Vec<String> = ips.iter().map(ToString::to_string).collect();
    let external = shown
        .first()
        .cloned()
        .unwrap_or_else(|| "<public address>".into());
    doctor.problem(
        &format!(
            "coturn relays at {}, but clients are given {} ({}): their peers would be sent to an address that is not coturn's public one",
            relayed.ip(),
            given.join(", "),
            if shown.is_empty() { "which does not resolve".to_string() } else { shown.join(", ") }
        ),
        &format!(
            "behind NAT, set external-ip={external}/{} in turnserver.conf; otherwise give clients the address coturn relays at with --public-coturn-uri",
            relayed.ip()
        ),
    );
}

/// Data sent from this machine to the relayed address must come out of the allocation.
async fn check_relay_ports(
    doctor: &mut Doctor<'_>,
    client: &mut Client,
    auth: &stun::Auth,
    relayed: SocketAddr,
) {
    let sender = match tokio::net::UdpSocket::bind(SocketAddr::new(client.local.ip(), 0)).await {
        Ok(sender) => sender,
        Err(e) => {
            doctor.warn(&format!(
                "the relay ports were not checked: cannot open a UDP socket ({e})"
            ));
            return;
        }
    };
    let Ok(from) = sender.local_addr() else {
        return;
    };
    if let Err(e) = doctor
        .timed("CreatePermission request", stun::permit(client, auth, from))
        .await
    {
        doctor.warn(&format!(
            "the relay ports were not checked from here: {}",
            match e {
                ProbeOutcome::Failed(why) => why,
                other => format!("{other:?}"),
            }
        ));
        return;
    }
    let probe = b"hypha-rtc doctor";
    if sender.send_to(probe, relayed).await.is_err() {
        doctor.warn("the relay ports were not checked: sending to the relayed address failed");
        return;
    }
    match stun::relayed_data(client, doctor.step).await {
        Some((_, data)) if data == probe => doctor.ok(&format!(
            "the relay port {} is reachable from this machine (data sent to it came out of the allocation)",
            relayed.port()
        )),
        _ => doctor.problem(
            &format!("data sent from this machine to the relayed address {relayed} never reached coturn"),
            "open coturn's relay ports (min-port to max-port, UDP) in the firewall",
        ),
    }
    // Nothing to answer, but the permission is there: the other direction too.
    let _ = stun::send_through(client, from, b"ok").await;
}

/// One listener clients are given: connection (and certificate), binding and allocation.
async fn check_listener(
    doctor: &mut Doctor<'_>,
    target: &HostPort,
    transport: Transport,
    secret: &SecretString,
    roots: Option<&Roots>,
) {
    let url = transport.url(target);
    let connected = doctor
        .timed("connection", Client::connect(target, transport, roots))
        .await;
    let mut client = match connected {
        Ok(((client, certificate), _)) => {
            if let Some(certificate) = certificate {
                check_certificate(doctor, target, &certificate);
            }
            client
        }
        Err(e) => {
            doctor.problem(
                &format!("{url}: {}", e.describe(target)),
                unreachable_advice(transport),
            );
            return;
        }
    };
    let attempt = async {
        stun::binding(&mut client).await?;
        stun::allocate(&mut client, secret, 300).await
    };
    match doctor.timed("TURN allocate request", attempt).await {
        Ok(((allocation, auth), took)) => {
            doctor.ok(&format!(
                "{url} ({}): allocation accepted in {}{}",
                transport.name(),
                ms(took),
                allocation
                    .relayed
                    .map(|r| format!(", relayed at {r}"))
                    .unwrap_or_default()
            ));
            stun::release(&mut client, &auth).await;
        }
        Err(ProbeOutcome::SecretRejected) => doctor.problem(
            &format!("{url}: coturn rejects credentials made with --coturn-secret"),
            "make --coturn-secret equal to static-auth-secret in this coturn's turnserver.conf",
        ),
        Err(e) => doctor.problem(
            &format!("{url}: {}", e.describe(target)),
            unreachable_advice(transport),
        ),
    }
}

fn check_certificate(doctor: &mut Doctor<'_>, target: &HostPort, certificate: &Certificate) {
    let now = crate::auth::now_secs();
    let days = (certificate.not_after - now) / 86_400;
    let names = if certificate.names.is_empty() {
        "no name".to_string()
    } else {
        certificate.names.join(", ")
    };
    let left = certificate.not_after - now;
    let when = if left < 2 * 86_400 {
        format!("{} hours", left.max(0) / 3600)
    } else {
        format!("{days} days")
    };
    let described = format!(
        "TLS certificate of {} for {names}, expires in {when}",
        target.authority()
    );
    match &certificate.trust {
        Err(why) => doctor.problem(
            &format!("{described}, is not trusted here: {why}"),
            &format!("browsers refuse such a turns: server; use a certificate for {} from a CA they trust (cert and pkey in turnserver.conf), or give this check the private CA with --ca-file", target.host),
        ),
        Ok(()) if certificate.not_after <= now => doctor.problem(
            &format!("{described}: it has expired"),
            "renew the certificate (cert and pkey in turnserver.conf) and restart coturn",
        ),
        Ok(()) if days < EXPIRY_WARNING_DAYS => {
            doctor.ok(&format!("{described}, trusted"));
            doctor.warn(&format!(
                "the TLS certificate of {} expires in {when}: renew it",
                target.authority()
            ));
        }
        Ok(()) => doctor.ok(&format!("{described}, trusted")),
    }
}
