//! Who this process is in a multi-process launch, from the variables the launchers users
//! already have set: torchrun's (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`) or Slurm's (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`; the master is
//! the first host of `SLURM_NODELIST` and the port 15000 + the last four digits of
//! `SLURM_JOB_ID`, as PyTorch Lightning picks them; `MASTER_ADDR`/`MASTER_PORT` win).

use super::DistError;

/// A process's place in a launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// The rank on this machine: the GPU it takes (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Which launcher's variables these are, for messages.
    pub launcher: &'static str,
}

impl Launch {
    /// The launch of this process, or None when no launcher's variables are set (a single
    /// process, as before). torchrun's variables win over Slurm's (torchrun inside an sbatch
    /// script); Slurm counts only with more than one task.
    pub fn from_env() -> Result<Option<Self>, DistError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Launch::from_env`] over any variable lookup.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, DistError> {
        let num = |k: &str| -> Result<Option<usize>, DistError> {
            match var(k) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| DistError::Env {
                    var: k.into(),
                    msg: format!("'{v}' is not a number"),
                }),
            }
        };
        let port_of = |v: String| -> Result<u16, DistError> {
            v.trim().parse().map_err(|_| DistError::Env {
                var: "MASTER_PORT".into(),
                msg: format!("'{v}' is not a port number"),
            })
        };
        if let (Some(rank), Some(world)) = (num("RANK")?, num("WORLD_SIZE")?) {
            let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
            let master_port = match var("MASTER_PORT") {
                Some(p) => port_of(p)?,
                None => 29500,
            };
            let local_rank = num("LOCAL_RANK")?.unwrap_or(rank);
            return Self::checked(Launch {
                rank,
                world,
                local_rank,
                master_addr,
                master_port,
                launcher: "torchrun",
            });
        }
        let Some(world) = num("SLURM_NTASKS")? else {
            return Ok(None);
        };
        if world <= 1 {
            return Ok(None);
        }
        let rank = num("SLURM_PROCID")?.ok_or_else(|| DistError::Env {
            var: "SLURM_PROCID".into(),
            msg: "not set while SLURM_NTASKS is: start the tasks with srun".into(),
        })?;
        let local_rank = num("SLURM_LOCALID")?.unwrap_or(0);
        let master_addr = match var("MASTER_ADDR") {
            Some(a) => a,
            None => {
                let list = var("SLURM_NODELIST")
                    .or_else(|| var("SLURM_JOB_NODELIST"))
                    .ok_or_else(|| DistError::Env {
                        var: "SLURM_NODELIST".into(),
                        msg: "not set: cannot tell rank 0's host (set MASTER_ADDR)".into(),
                    })?;
                first_host(&list)
            }
        };
        let master_port = match var("MASTER_PORT") {
            Some(p) => port_of(p)?,
            None => slurm_port(var("SLURM_JOB_ID").as_deref()),
        };
        Self::checked(Launch {
            rank,
            world,
            local_rank,
            master_addr,
            master_port,
            launcher: "Slurm",
        })
    }

    fn checked(l: Launch) -> Result<Option<Self>, DistError> {
        if l.world == 0 || l.rank >= l.world {
            return Err(DistError::Env {
                var: if l.launcher == "Slurm" {
                    "SLURM_PROCID".into()
                } else {
                    "RANK".into()
                },
                msg: format!("rank {} is not below the world size {}", l.rank, l.world),
            });
        }
        Ok(Some(l))
    }
}

/// Lightning's port for a Slurm job: 15000 + the job id's last four digits (12910 without one).
pub fn slurm_port(job_id: Option<&str>) -> u16 {
    let Some(id) = job_id else { return 12910 };
    let digits: String = id.chars().filter(char::is_ascii_digit).collect();
    let tail = &digits[digits.len().saturating_sub(4)..];
    tail.parse::<u16>().map(|v| 15000 + v).unwrap_or(12910)
}

/// The first host of a Slurm node list: `node[07-09,12],gpu3` -> `node07`.
pub fn first_host(list: &str) -> String {
    let list = list.trim();
    let end = list
        .char_indices()
        .find(|&(_, c)| c == ',' || c == '[')
        .map(|(i, _)| i)
        .unwrap_or(list.len());
    let name = &list[..end];
    if list[end..].starts_with('[') {
        let inner = &list[end + 1..];
        let first: String = inner
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        format!("{name}{first}")
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>, DistError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_slurm_and_none() {
        assert_eq!(launch(&[]).unwrap(), None);
        let t = launch(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "29400"),
            ("SLURM_NTASKS", "8"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (t.rank, t.world, t.local_rank, t.master_port, t.launcher),
            (3, 4, 1, 29400, "torchrun")
        );
        assert_eq!(t.master_addr, "10.0.0.2");
        let s = launch(&[
            ("SLURM_NTASKS", "8"),
            ("SLURM_PROCID", "5"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODELIST", "gpu[017-018,020],login2"),
            ("SLURM_JOB_ID", "4812345"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (s.rank, s.world, s.local_rank, s.master_port),
            (5, 8, 1, 17345)
        );
        assert_eq!(s.master_addr, "gpu017");
        // One Slurm task is a single process.
        assert_eq!(launch(&[("SLURM_NTASKS", "1")]).unwrap(), None);
        let e = launch(&[("RANK", "2"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(
            e.to_string()
                .contains("rank 2 is not below the world size 2"),
            "{e}"
        );
        let e = launch(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(
            e.to_string().starts_with("RANK: 'x' is not a number"),
            "{e}"
        );
        assert_eq!(first_host("n1,n2"), "n1");
        assert_eq!(first_host("node"), "node");
        assert_eq!(slurm_port(Some("12")), 15012);
    }
}
