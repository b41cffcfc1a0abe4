# netboot as a Nomad system job: one allocation on every client with
# meta.netboot = "true" (docs/operations.md, "Running a fleet").
#
# Each such client needs, in its agent configuration:
#
#   client {
#     meta { netboot = "true" }
#     host_volume "netboot-config" {
#       path      = "/etc/netboot"
#       read_only = true
#     }
#     host_volume "netboot-data" {
#       path = "/var/lib/netboot"
#     }
#   }
#   plugin "docker" {
#     config {
#       # Nomad's default allow_caps leaves out net_raw; netboot needs it.
#       allow_caps = ["audit_write", "chown", "dac_override", "fowner", "fsetid", "kill",
#                     "mknod", "net_bind_service", "net_raw", "setfcap", "setgid",
#                     "setpcap", "setuid", "sys_chroot"]
#     }
#   }
#
# and /etc/netboot/netboot.yaml with `data_dir: /var/lib/netboot` and
# `registry: postgresql://netboot@db.example/netboot`. The fleet's shared secret is a
# Nomad Variable the job's tasks may read (path nomad/jobs/<job id>); put it before
# the job runs:
#
#   nomad var put nomad/jobs/netboot secret="$(openssl rand -hex 32)"
#
# netboot:latest is built from this repository and must have `netboot` on its PATH.
# tests/test_deploy.py parses this file with python-hcl2 (syntax and structure only;
# `nomad job validate` is what checks Nomad's own rules).

job "netboot" {
  type        = "system"
  datacenters = ["*"]

  constraint {
    attribute = "${meta.netboot}"
    value     = "true"
  }

  # One client at a time, so a bad image stops at the first rack.
  update {
    max_parallel = 1
    stagger      = "30s"
  }

  group "netboot" {
    # ProxyDHCP answers broadcasts on the segment and binds its sockets to the
    # interface: the task runs in the host's network namespace, and netboot binds
    # udp/67, 4011, 69 and tcp/8080 itself (no port mapping).
    network {
      mode = "host"
    }

    volume "config" {
      type      = "host"
      source    = "netboot-config"
      read_only = true
    }

    volume "data" {
      type   = "host"
      source = "netboot-data"
    }

    restart {
      attempts = 10
      interval = "30m"
      delay    = "5s"
      mode     = "delay"
    }

    task "netboot" {
      driver       = "docker"
      kill_timeout = "20s"

      config {
        image        = "netboot:latest"
        command      = "netboot"
        args         = ["serve", "--config", "/etc/netboot/netboot.yaml"]
        network_mode = "host"
        # Docker's default set has both capabilities; dropping the rest leaves only
        # NET_BIND_SERVICE (udp/67 and 69, below 1024, in the host's namespace) and
        # NET_RAW (SO_BINDTODEVICE, broadcast replies).
        cap_drop        = ["all"]
        cap_add         = ["net_bind_service", "net_raw"]
        readonly_rootfs = true

        mount {
          type   = "tmpfs"
          target = "/tmp"
          tmpfs_options {
            size = 67108864
          }
        }

        ulimit {
          # a rack powering on holds ~1,000 TFTP sockets and ~1,000 HTTP connections
          nofile = "65536:65536"
        }
      }

      volume_mount {
        volume      = "config"
        destination = "/etc/netboot"
        read_only   = true
      }

      volume_mount {
        volume      = "data"
        destination = "/var/lib/netboot"
      }

      # The shared secret from Nomad Variables, rendered into the task's private
      # secrets/ directory and read into its environment (env = true) as
      # NETBOOT_SECRET. A changed variable restarts the task with the new value.
      template {
        destination = "secrets/netboot.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/netboot" }}NETBOOT_SECRET={{ .secret }}{{ end }}
        EOT
      }

      resources {
        cpu    = 2000
        memory = 1024
      }
    }
  }
}
